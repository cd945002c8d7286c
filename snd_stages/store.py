"""Content-addressed artifact store with manifests, atomic writes and per-unit resume.

Layout under the store root::

    <stage>/<key>/                 a complete artifact (only ever created by an atomic rename)
        manifest.json              stage, key, schema version, params, input keys, producer version, counts
        config.yaml                the resolved pipeline config that produced it
        data.zarr/                 Zarr v3 group; one child group per unit (scene, sample, ...)
        *.json                     small documents (e.g. the frozen sample list)
    <stage>/<key>.partial/         an artifact being written; never read as complete
        data.zarr/<unit>/          units already finished (each arrived by an atomic rename)
        tmp/                       units being written

The key is a hash of (stage, schema version, parameters, input keys, producer version): a rerun with the same
key finds the artifact and does nothing; a changed parameter makes a new key, and :func:`describe_changes`
says which field changed against the newest artifact of the same stage. A killed writer leaves only a
``.partial`` directory whose finished units are kept: the rerun skips them and writes the rest.

Readers trust nothing but a published manifest: :meth:`Store.open` refuses a directory without one, a manifest
that is not complete, names another stage or key, or counts other units than the directory holds, and an
artifact of another schema version, each with one line that says what to run.

Integrity: each unit is sealed when it is written by a record of its files (``snd-unit.json``: every file's size
and CRC32C), and the manifest records the artifact's other files (its JSON documents, the root group) the same
way. A reader verifies a unit the first time a process opens it (:meth:`Artifact.unit`), and a document each time
it is read, so a missing, truncated, altered or added file is a one-line error naming the file and the command
that rebuilds it, never zeros or a traceback. ``snd check-store`` verifies a whole store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import google_crc32c
import zarr
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from . import __version__
from .errors import ArtifactError, ConfigError
from .geometry import CONVENTIONS

MANIFEST = "manifest.json"
DATA = "data.zarr"
UNIT_RECORD = "snd-unit.json"
# Part of every key: 2 = units and documents carry records of their files (older artifacts are never read).
STORE_FORMAT = 2

# The command that writes each stage's artifacts, so that messages can say what to run.
PRODUCERS = {
    "samples": "snd sample-views",
    "gaussians": "snd precompute-gaussians",
    "masks": "snd precompute-masks",
    "operators": "snd precompute-operators",
    "features": "snd eval",
    "ground_truth": "snd eval",
}


def producer(stage: str) -> str:
    """The command that (re)builds artifacts of ``stage``, for error messages."""
    return PRODUCERS.get(stage, f"the '{stage}' stage")


@dataclass(frozen=True)
class ArtifactSpec:
    """Everything that determines an artifact's content, hence its key.

    Attributes:
        stage: producing stage, e.g. ``"samples"``.
        schema_version: bumped whenever the stored layout or meaning changes.
        params: the stage's parameters (JSON-able).
        inputs: name -> key (or content fingerprint) of every input artifact or dataset.
        in_store: whether it is stored in the artifact store, whose format then enters the key (not for the
            generated demo dataset, which lives outside it).
    """

    stage: str
    schema_version: int
    params: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    in_store: bool = True

    def ingredients(self) -> dict[str, Any]:
        ingredients = {
            "stage": self.stage,
            "schema_version": self.schema_version,
            "params": _jsonable(self.params),
            "inputs": dict(sorted(self.inputs.items())),
            "producer_version": __version__,
        }
        if self.in_store:
            ingredients["store_format"] = STORE_FORMAT
        return ingredients

    @property
    def key(self) -> str:
        return hash_json(self.ingredients())[:20]


def hash_json(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    text = json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | Path, setting: str | None = None) -> str:
    """sha256 of a file's bytes: what a key records of a checkpoint, so that replacing the file at the same path
    makes new artifacts and moving it keeps the old ones.

    Hashed once per (path, size, modification time) in a process (a SAM ViT-H checkpoint takes seconds).

    Raises:
        ConfigError: the file does not exist; names ``setting`` (e.g. ``gaussians.mvsplat.checkpoint``) if given.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        where = f"{setting} = {path}" if setting else str(path)
        raise ConfigError(f"{where} does not exist ({error.strerror}); point it at the checkpoint file") from None
    return _sha256_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


def file_stamp(path: str | Path) -> list[int] | None:
    """A file's size and modification time (ns), or None where it is missing: what keys record of large inputs
    (datasets' images, depth, masks) instead of their bytes, which would take minutes to hash. The time is there
    because a file rewritten in place can keep its size (a fixed-size format, or a flat PNG of other values).
    Copying a dataset without keeping times therefore recomputes its artifacts once, never reuses stale ones."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def checkpoint_by_content(params: dict[str, Any], field: str, input_name: str, setting: str
                          ) -> tuple[dict[str, Any], dict[str, str]]:
    """A key's ``params`` without the checkpoint path in ``field``, and ``{input_name: the file's sha256}``: a
    checkpoint enters a key by its contents, not where it lies (nothing where the path is None; ``setting`` names
    it in the error for a missing file)."""
    params = dict(params)
    path = params.pop(field)
    return params, ({} if path is None else {input_name: file_sha256(path, setting)})


def small_file_identity(path: Path | None) -> dict | None:
    """Name and sha256 of a small input file; None where it is unset or missing (reading it reports that)."""
    if path is None or not Path(path).is_file():
        return None
    return {"name": Path(path).name, "sha256": file_sha256(path)}


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, modified_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_directory(final: Path, scratch: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``final`` by one rename if the block succeeds.

    The temporary directory lives in ``scratch`` (default: beside ``final``, hidden by a leading dot) on the same
    file system, so the rename is atomic: ``final`` either does not exist or is complete. On an exception the
    temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    scratch = Path(scratch) if scratch is not None else final.parent
    scratch.mkdir(parents=True, exist_ok=True)
    temporary = scratch / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
        try:
            os.rename(temporary, final)
        except OSError as error:
            # Another writer finished the same unit first (rename refuses a non-empty target); theirs is
            # identical by construction (same key).
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
            shutil.rmtree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def file_checksum(path: Path) -> str:
    """CRC32C of a file's bytes, as 8 hex digits (about 10 GB/s: google-crc32c, which zarr depends on)."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            checksum.update(block)
    return checksum.hexdigest().decode()


def file_record(path: Path) -> list:
    """``[size, CRC32C]`` of a file: what manifests and unit seals record of it (:func:`verify_files`)."""
    return [path.stat().st_size, file_checksum(path)]


def file_records(directory: Path, leave_out: Callable[[str], bool] = lambda name: False) -> dict[str, list]:
    """``{relative path: [size, CRC32C]}`` of every file under ``directory`` whose relative path ``leave_out``
    does not reject, in sorted order."""
    records = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and not leave_out(relative):
            records[relative] = file_record(path)
    return records


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool, refusal: str) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if needed; shared unless ``exclusive``) until the block ends.

    The operating system releases it when the process dies, so a killed command never leaves it held.

    Raises:
        ArtifactError: ``refusal``, when another process holds a conflicting lock (no waiting).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(refusal) from None
        yield


def verify_files(directory: Path, records: dict[str, list], files: Iterable[str], fix: str,
                 contents: Mapping[str, bytes] | None = None) -> None:
    """Check the files ``files`` (relative to ``directory``) against ``records``: none missing, none added, each
    of its recorded size and checksum; from ``contents`` (relative path -> the bytes read) where given, else from
    the files.

    Raises:
        ArtifactError: one line naming the first damaged file and ``fix``.
    """
    files = set(files)
    missing, added = sorted(set(records) - files), sorted(files - set(records))
    if missing:
        raise ArtifactError(f"{directory / missing[0]} is missing ({len(missing)} file(s) of {directory} are gone); "
                            f"{fix}")
    if added:
        raise ArtifactError(f"{directory / added[0]} was not written by snd ({len(added)} file(s) added to "
                            f"{directory} after it was sealed); {fix}")
    for relative, (size, checksum) in records.items():
        path = directory / relative
        actual = path.stat().st_size if contents is None else len(contents[relative])
        if actual != size:
            raise ArtifactError(f"{path} is {'truncated' if actual < size else 'altered'} ({actual:,} bytes, "
                                f"{size:,} when written); {fix}")
        if (file_checksum(path) if contents is None else bytes_checksum(contents[relative])) != checksum:
            raise ArtifactError(f"{path} was altered after it was written (its checksum differs); {fix}")


def bytes_checksum(content: bytes) -> str:
    """:func:`file_checksum` of bytes in hand."""
    return google_crc32c.Checksum(content).hexdigest().decode()


def seal_unit(directory: Path, contents: Mapping[str, bytes] | None = None) -> None:
    """Record the sizes and checksums of a finished unit's files in ``snd-unit.json`` inside it; from ``contents``
    (relative path -> the bytes written, every file of the unit) where given, else by reading the files."""
    if contents is None:
        records = file_records(directory, lambda name: name == UNIT_RECORD)
    else:
        records = {relative: [len(content), bytes_checksum(content)] for relative, content in sorted(contents.items())}
    (directory / UNIT_RECORD).write_text(json.dumps({"files": records}, separators=(",", ":")))


def _unit_seal(directory: Path, fix: str) -> dict[str, list]:
    """The records of a unit's seal (:func:`seal_unit`).

    Raises:
        ArtifactError: the seal is missing or unreadable.
    """
    try:
        records = json.loads((directory / UNIT_RECORD).read_text())["files"]
        if not isinstance(records, dict):
            raise TypeError("files is not an object")
    except FileNotFoundError:
        raise ArtifactError(f"{directory} has no {UNIT_RECORD} (its record of sizes and checksums), so it cannot be "
                            f"trusted; {fix}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{directory / UNIT_RECORD} is damaged ({error}); {fix}") from None
    return records


def _unit_files(directory: Path) -> list[str]:
    """A unit's files but its seal, relative to it."""
    return [path.relative_to(directory).as_posix() for path in directory.rglob("*")
            if path.is_file() and path.name != UNIT_RECORD]


_VERIFIED_UNITS: set[Path] = set()  # units this process has verified (each is verified once per process)


def verify_unit(directory: Path, fix: str, again: bool = False) -> None:
    """Verify a unit's files against its seal (:func:`seal_unit`), once per process unless ``again``.

    Raises:
        ArtifactError: the seal is missing or unreadable, or a file is missing, added, truncated or altered.
    """
    if directory in _VERIFIED_UNITS and not again:
        return
    verify_files(directory, _unit_seal(directory, fix), _unit_files(directory), fix)
    _VERIFIED_UNITS.add(directory)


@dataclass(frozen=True)
class Artifact:
    """A complete artifact, opened read-only."""

    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def rebuild(self) -> str:
        """What to do about a damaged artifact, for error messages."""
        return f"delete {self.path} and rerun {producer(self.manifest.get('stage', '?'))}"

    def group(self) -> zarr.Group:
        return zarr.open_group(store=str(self.path / DATA), mode="r")

    def unit(self, name: str) -> zarr.Group:
        """Unit ``name``'s Zarr group, its files verified against the unit's seal (the first time per process)."""
        path = self._unit_path(name)
        verify_unit(path, self.rebuild)
        return self._open_unit(path, str(path))

    def load_unit(self, name: str) -> zarr.Group:
        """Unit ``name`` read whole into memory and verified against its seal from the bytes read (every time), as a
        read-only Zarr group: for readers that use all of a unit, each file is read once (by :meth:`unit`, once to
        verify and again by Zarr) and Zarr decodes from memory (a 192x256 pair of Gaussians: 4.8 instead of 6.6 ms
        on one core, `benchmarks/units.py`)."""
        path = self._unit_path(name)
        records = _unit_seal(path, self.rebuild)
        contents = {relative: (path / relative).read_bytes() for relative in _unit_files(path)}
        verify_files(path, records, contents, self.rebuild, contents)
        buffers = {relative: cpu.Buffer.from_bytes(content) for relative, content in contents.items()}
        return self._open_unit(path, MemoryStore(buffers, read_only=True))

    def _unit_path(self, name: str) -> Path:
        path = self.path / DATA / name
        if not (path / "zarr.json").is_file():
            raise ArtifactError(f"artifact {self.path} has no unit {name!r}")
        return path

    def _open_unit(self, path: Path, store: Any) -> zarr.Group:
        try:
            return zarr.open_group(store=store, mode="r")
        except (ValueError, KeyError, TypeError) as error:  # a zarr.json the seal cannot vouch for
            raise ArtifactError(f"{path} is not a readable Zarr group ({error}); {self.rebuild}") from None

    def units(self) -> list[str]:
        return list_units(self.path / DATA)

    def read_json(self, name: str) -> Any:
        """A JSON document of the artifact, verified against the manifest's record of it."""
        self.verify_documents([name])
        try:
            return json.loads((self.path / name).read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{self.path / name} is not valid JSON ({error}); {self.rebuild}") from None

    def verify_documents(self, names: Iterable[str] | None = None) -> None:
        """Check the artifact's files outside its units (``names``, default all) against the manifest's records."""
        records = self.manifest.get("files")
        if not isinstance(records, dict):
            raise ArtifactError(f"{self.path / MANIFEST} records no files (not written by this snd); {self.rebuild}")
        names = list(records) if names is None else list(names)
        chosen = {name: records[name] for name in names if name in records}
        verify_files(self.path, chosen, [name for name in names if (self.path / name).is_file()], self.rebuild)

    def verify(self) -> None:
        """Verify every file of the artifact now: its documents and every unit."""
        self.verify_documents()
        for name in self.units():
            verify_unit(self.path / DATA / name, self.rebuild, again=True)


def list_units(data_path: Path) -> list[str]:
    """Names of the finished units under a ``data.zarr`` directory (each one arrived by an atomic rename)."""
    try:
        return sorted(p.name for p in data_path.iterdir() if p.is_dir() and (p / "zarr.json").is_file())
    except FileNotFoundError:  # not started, or published (renamed away) by another shard meanwhile
        return []


class Store:
    """The artifact store rooted at ``root`` (see the module docstring for the layout)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def final_path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f"{key}.partial"

    def exists(self, spec: ArtifactSpec) -> bool:
        return (self.final_path(spec.stage, spec.key) / MANIFEST).is_file()

    def open(self, stage: str, key: str, schema_version: int | None = None) -> Artifact:
        """Open a complete artifact; raise :class:`ArtifactError` if it is missing, partial or of another schema.

        Only a published manifest makes an artifact complete, and it must agree with the directory: same stage
        and key, and as many finished units as it counts.
        """
        path = self.final_path(stage, key)
        manifest_path = path / MANIFEST
        command = producer(stage)
        if not manifest_path.is_file():
            if path.exists():
                raise ArtifactError(
                    f"{path} has no {MANIFEST}, so it is not a complete artifact (copied in part, or not written "
                    f"by snd); delete it and rerun {command}"
                )
            if self.partial_path(stage, key).exists():
                raise ArtifactError(
                    f"artifact {stage}/{key} in {self.root} is incomplete (an interrupted run left "
                    f"{self.partial_path(stage, key).name}); rerun {command} with the same config to finish it"
                )
            raise ArtifactError(
                f"no artifact {stage}/{key} in {self.root}; run the stage that produces '{stage}' first "
                f"({command}), or check that --config points at the same pipeline.yaml"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
            raise ArtifactError(
                f"{manifest_path} is not valid JSON ({error}); delete {path} and rerun {command}"
            ) from None
        if not isinstance(manifest, dict) or not manifest.get("complete", False):
            raise ArtifactError(
                f"{manifest_path} does not mark the artifact complete; delete {path} and rerun {command}"
            )
        if schema_version is not None and manifest.get("schema_version") != schema_version:
            raise ArtifactError(
                f"artifact {path} has schema version {manifest.get('schema_version')}, this snd reads "
                f"version {schema_version}; rebuild it with {command} --force"
            )
        if (manifest.get("stage"), manifest.get("key")) != (stage, key):
            raise ArtifactError(
                f"{manifest_path} describes artifact {manifest.get('stage')}/{manifest.get('key')}, not "
                f"{stage}/{key} (the directory was renamed or copied over); delete {path} and rerun {command}"
            )
        if manifest.get("store_format") != STORE_FORMAT:
            raise ArtifactError(
                f"{manifest_path} is of store format {manifest.get('store_format')}, this snd reads format "
                f"{STORE_FORMAT}; delete {path} and rerun {command}"
            )
        units = list_units(path / DATA)
        if manifest.get("units") != len(units):
            raise ArtifactError(
                f"{path} holds {len(units)} finished unit(s) but its manifest counts {manifest.get('units')}: units "
                f"were added or removed after it was published; delete {path} and rerun {command}"
            )
        artifact = Artifact(path, manifest)
        artifact.verify_documents([f"{DATA}/zarr.json"])
        return artifact

    def complete_artifacts(self, stage: str) -> list[Artifact]:
        """Every complete artifact of ``stage``, oldest first. A manifest that cannot be read as snd writes it
        (damaged, or not snd's) is passed over: it says nothing about the newest artifact, and blocks nothing."""
        directory = self.root / stage
        found = []
        if directory.is_dir():
            for path in directory.iterdir():
                manifest_path = path / MANIFEST
                if path.is_dir() and not path.name.endswith(".partial") and manifest_path.is_file():
                    try:
                        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
                    except (OSError, ValueError, UnicodeDecodeError):
                        continue
                    created = manifest.get("created") if isinstance(manifest, dict) else None
                    if isinstance(created, (int, float)) and not isinstance(created, bool):
                        found.append(Artifact(path, manifest))
        return sorted(found, key=lambda a: a.manifest["created"])

    def describe_changes(self, spec: ArtifactSpec) -> list[str]:
        """What differs between ``spec`` and the newest complete artifact of the same stage, one line each."""
        previous = self.complete_artifacts(spec.stage)
        if not previous:
            return []
        old = previous[-1].manifest
        new = spec.ingredients()
        changes = []
        for section in ("params", "inputs"):
            for name, (before, after) in _diff(old.get(section, {}), new[section]).items():
                changes.append(f"{section}.{name}: {json.dumps(before)} -> {json.dumps(after)}")
        for name in ("schema_version", "producer_version", "store_format"):
            if old.get(name) != new[name]:
                changes.append(f"{name}: {old.get(name)} -> {new[name]}")
        return changes

    @contextlib.contextmanager
    def writing(self, spec: ArtifactSpec, shard: tuple[int, int] = (0, 1)) -> Iterator[None]:
        """Hold the right to write ``spec``'s artifact (shard ``index`` of ``count``) until the block ends.

        A second identical command would race the first (one publishes and removes the scratch space while the
        other still writes), so it is refused, naming what holds the artifact. Shards of one artifact may run
        together; a whole-artifact writer excludes every other writer. The locks are advisory file locks, released
        by the operating system when a process dies.

        Raises:
            ArtifactError: another process writes the same artifact, or the same shard of it.
        """
        index, count = shard
        directory = self.root / spec.stage
        what = f"{spec.stage}/{spec.key}" + (f" (shard {index}/{count})" if count > 1 else "")
        refusal = (f"another {producer(spec.stage)} command is writing {what} in {self.root}; wait for it to finish "
                   "(a rerun then finds its work), or stop it and rerun")
        with contextlib.ExitStack() as held:
            held.enter_context(file_lock(directory / f".{spec.key}.writers.lock", count == 1, refusal))
            if count > 1:
                held.enter_context(file_lock(directory / f".{spec.key}.shard-{index}-of-{count}.lock", True, refusal))
            yield

    def writer(self, spec: ArtifactSpec, config_yaml: str, force: bool = False) -> "ArtifactWriter":
        """Start (or resume) writing the artifact of ``spec``. ``force`` deletes any existing copy first."""
        final = self.final_path(spec.stage, spec.key)
        partial = self.partial_path(spec.stage, spec.key)
        if force:
            shutil.rmtree(final, ignore_errors=True)
            shutil.rmtree(partial, ignore_errors=True)
        return ArtifactWriter(self, spec, config_yaml, final, partial)


@dataclass
class UnitArrays:
    """A whole unit as plain arrays and attributes, ready to write (by a writing thread, or in any process: numpy
    arrays pickle as their bytes; tensors and open Zarr groups do not travel).

    ``options`` holds each array's ``create_array`` keywords (chunks, compressors); an array without any gets
    Zarr's defaults.
    """

    arrays: dict[str, Any]
    attributes: dict[str, Any]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self, group: zarr.Group) -> None:
        for name, values in self.arrays.items():
            group.create_array(name, data=values, **self.options.get(name, {}))
        group.update_attributes(self.attributes)


# Units up to this many bytes (before compression) are encoded in memory and then written (ArtifactWriter.write_unit).
MOST_BYTES_THROUGH_MEMORY = 8 << 20


class ArtifactWriter:
    """Writes one artifact unit by unit into ``<key>.partial`` and publishes it with one rename when complete."""

    def __init__(self, store: Store, spec: ArtifactSpec, config_yaml: str, final: Path, partial: Path):
        self.store = store
        self.spec = spec
        self.config_yaml = config_yaml
        self.final = final
        self.partial = partial
        self.data = partial / DATA
        self.scratch = partial / "tmp"

    @property
    def complete(self) -> bool:
        return (self.final / MANIFEST).is_file()

    def root_attributes(self) -> dict[str, Any]:
        return {
            "snd": {
                "stage": self.spec.stage,
                "key": self.spec.key,
                "schema_version": self.spec.schema_version,
                "producer_version": __version__,
                "conventions": CONVENTIONS,
            }
        }

    def prepare(self, attributes: dict[str, Any] | None = None) -> None:
        """Create the partial directory and the root Zarr group (idempotent: a resumed run keeps what exists)."""
        self.partial.mkdir(parents=True, exist_ok=True)
        if not (self.data / "zarr.json").is_file():
            with atomic_directory(self.data, scratch=self.partial) as temporary:
                group = zarr.open_group(store=str(temporary), mode="w", zarr_format=3)
                group.update_attributes({**self.root_attributes(), **(attributes or {})})

    def done_units(self) -> set[str]:
        units = list_units(self.data)
        if not units and self.complete:  # another shard published the artifact meanwhile
            units = list_units(self.final / DATA)
        return set(units)

    def unit_attributes(self, name: str) -> dict[str, Any]:
        """Attributes of a finished unit (e.g. to total its counts before publishing)."""
        try:
            return dict(zarr.open_group(store=str(self.data / name), mode="r").attrs)
        except FileNotFoundError:
            if not self.complete:
                raise
            # Another shard published the artifact (renamed the partial directory) while this one read it.
            return dict(zarr.open_group(store=str(self.final / DATA / name), mode="r").attrs)

    @contextlib.contextmanager
    def unit(self, name: str) -> Iterator[zarr.Group]:
        """A fresh Zarr group for unit ``name``, written to disk as the block writes it (for units built piece by
        piece); it appears in the artifact only if the block completes."""
        with self._atomic_unit(name) as temporary:
            yield zarr.open_group(store=str(temporary), mode="w", zarr_format=3)
            seal_unit(temporary)

    def write_unit(self, name: str, unit: UnitArrays) -> None:
        """Write unit ``name`` whole (a writer and a :class:`UnitArrays` pickle, so this runs in any process).

        A small unit is encoded by Zarr into memory and its files then go to disk in one pass, sealed from the bytes
        in hand: the same files as :meth:`unit` writes, in two thirds of the time (Zarr's local store hands every
        file operation to a thread; a 192x256 pair of Gaussians: 9.5 instead of 13.8 ms, an operator 7.2 instead of
        13.3 ms on one core, ``benchmarks/units.py``). A large one is written as Zarr encodes it, which overlaps
        its chunks' compression with their writing (a 576x880 pair: 56 ms to encode, 81 ms to write its 14 MB).
        """
        if sum(values.nbytes for values in unit.arrays.values()) > MOST_BYTES_THROUGH_MEMORY:
            with self.unit(name) as group:
                unit.write(group)
            return
        buffers: dict[str, Any] = {}
        unit.write(zarr.open_group(store=MemoryStore(buffers), mode="w", zarr_format=3))
        contents = {relative: buffer.to_bytes() for relative, buffer in buffers.items()}
        with self._atomic_unit(name) as temporary:
            for relative, content in contents.items():
                path = temporary / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            seal_unit(temporary, contents)

    def _atomic_unit(self, name: str) -> contextlib.AbstractContextManager[Path]:
        assert "/" not in name and not name.startswith("."), f"bad unit name {name!r}"
        return atomic_directory(self.data / name, scratch=self.scratch)

    def write_json(self, name: str, value: Any) -> None:
        """A small JSON document inside the artifact, written atomically."""
        self.partial.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.partial / name, json.dumps(_jsonable(value), indent=1, sort_keys=False))

    def finish(
        self,
        expected_units: Iterable[str] | None = None,
        counts: dict[str, Any] | Callable[[], dict[str, Any]] | None = None,
    ) -> Artifact:
        """Publish the artifact if every expected unit is present; return it.

        Several processes (shards) may call this; a file lock makes exactly one of them publish, and the others
        find the published artifact. ``counts`` may be a function, called under the lock once every unit is
        present: a total over the units taken any earlier can miss units another shard finished meanwhile.
        """
        lock_path = self.final.parent / f".{self.final.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.complete:
                return self.store.open(self.spec.stage, self.spec.key)
            if self.final.exists():
                raise ArtifactError(
                    f"{self.final} exists but has no {MANIFEST} (not written by snd, or copied in part); delete it "
                    f"or rerun with --force"
                )
            done = self.done_units()
            if expected_units is not None:
                missing = sorted(set(expected_units) - done)
                if missing:
                    raise ArtifactError(
                        f"artifact {self.spec.stage}/{self.spec.key} still lacks {len(missing)} unit(s) "
                        f"(first: {missing[0]}); run the remaining shards, then this artifact completes"
                    )
            manifest = {
                **self.spec.ingredients(),
                "key": self.spec.key,
                "complete": True,
                "created": time.time(),
                "units": len(done),
                "counts": _jsonable((counts() if callable(counts) else counts) or {}),
                "conventions": CONVENTIONS,
            }
            write_text_atomic(self.partial / "config.yaml", self.config_yaml)
            shutil.rmtree(self.scratch, ignore_errors=True)
            # Temporaries of a killed run's atomic writes (".<name>.tmp-...") are never part of the artifact.
            for leftover in self.partial.glob(".*.tmp-*"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            # Everything outside the units (which carry their own seals): the documents and the root group.
            manifest["files"] = file_records(self.partial, lambda name: name == MANIFEST or (
                name.startswith(f"{DATA}/") and name != f"{DATA}/zarr.json"))
            write_text_atomic(self.partial / MANIFEST, json.dumps(manifest, indent=1))
            os.rename(self.partial, self.final)
        return self.store.open(self.spec.stage, self.spec.key)


def _diff(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        result = {}
        for name in sorted(set(old) | set(new)):
            result.update(_diff(old.get(name), new.get(name), f"{prefix}{name}."))
        return result
    if old != new:
        return {prefix.rstrip("."): (old, new)}
    return {}
