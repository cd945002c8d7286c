"""``snd make-demo-data``: generate the embedded default dataset, in the ScanNet++ layout, under ``data.root``.

Usage::

    snd make-demo-data --config pipeline.yaml --set demo.train_scenes=2 --set demo.frames_per_scene=24

Scenes are the units of work: each one is written to a hidden temporary folder and renamed into
``scenes/<id>`` when complete, so an interrupted run keeps its finished scenes and a rerun generates only
the rest. ``snd_dataset.json`` (written last) records the generator parameters and their key; a rerun with
the same parameters does nothing, other parameters need ``--force`` (the old scenes are deleted).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from ..config import DataCfg, DemoCfg, dump_sections, to_dict
from ..errors import ConfigError
from ..progress import track
from ..scenes.layout import frame_file_name, write_scene, write_split_files
from ..store import ArtifactSpec, atomic_directory, write_text_atomic

STAGE = "demo-data"
SCHEMA_VERSION = 1
MANIFEST = "snd_dataset.json"
PARTIAL_MARKER = ".snd_dataset.partial.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoDataResult:
    root: Path
    key: str
    skipped: bool
    generated: list[str]
    resumed: list[str]


def demo_scene_ids(demo: DemoCfg) -> dict[str, list[str]]:
    """Scene ids per split: ``train`` then ``val`` (held out: never sampled for training)."""
    return {
        "train": [f"demo{index:04d}" for index in range(demo.train_scenes)],
        "val": [f"demo{index:04d}" for index in range(demo.train_scenes, demo.train_scenes + demo.eval_scenes)],
    }


def scene_seed(demo: DemoCfg, scene_id: str) -> int:
    """Each scene's generator seed: a function of the dataset seed and the scene's number only."""
    return demo.seed * 1_000_003 + int(scene_id.removeprefix("demo"))


def make_demo_data(data: DataCfg, demo: DemoCfg, force: bool = False, progress: Progress | None = None) -> DemoDataResult:
    """Write (or resume, or skip) the demo dataset described by ``demo`` under ``data.root``."""
    if data.dataset != "demo":
        raise ConfigError(
            f"data.dataset = {data.dataset!r}: make-demo-data writes generated scenes and only runs with "
            "data.dataset = 'demo' (so it never writes into a real dataset root)"
        )
    root = Path(data.root)
    spec = ArtifactSpec(STAGE, SCHEMA_VERSION, params=to_dict(demo), in_store=False)
    manifest_path, marker_path = root / MANIFEST, root / PARTIAL_MARKER

    existing = _read_json(manifest_path) or _read_json(marker_path)
    if existing is not None and existing.get("key") != spec.key:
        if not force:
            changed = [
                f"demo.{name}: {existing['params'].get(name)!r} -> {value!r}"
                for name, value in to_dict(demo).items()
                if existing.get("params", {}).get(name) != value
            ]
            raise ConfigError(
                f"{root} holds demo scenes made with other parameters ({'; '.join(changed) or 'another version'}); "
                "rerun with --force to replace them, or set data.root to another folder"
            )
    elif existing is None and (root / "scenes").is_dir() and any((root / "scenes").iterdir()) and not force:
        raise ConfigError(
            f"{root}/scenes exists but was not written by make-demo-data; set data.root to an empty folder "
            "(or pass --force to delete its scenes)"
        )
    elif manifest_path.is_file() and not force:
        return DemoDataResult(root, spec.key, skipped=True, generated=[], resumed=[])

    if force or (existing is not None and existing.get("key") != spec.key):
        for stale in ("scenes", "metadata"):
            shutil.rmtree(root / stale, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)

    # Imported only to generate: scene generation needs open3d (a 400 MB wheel), finding the scenes up to date does
    # not, so machines without open3d can run make all on scenes generated elsewhere.
    from ..scenes.demo import SEMANTIC_CLASSES, generate_scene

    root.mkdir(parents=True, exist_ok=True)
    record = {"generator": "snd demo scenes", "key": spec.key, "params": to_dict(demo), "schema_version": SCHEMA_VERSION}
    write_text_atomic(marker_path, json.dumps(record, indent=1))

    splits = demo_scene_ids(demo)
    all_ids = splits["train"] + splits["val"]
    resumed = [scene_id for scene_id in all_ids if (root / "scenes" / scene_id).is_dir()]
    if resumed:
        log.info("resuming: %d of %d scenes were finished by an earlier run", len(resumed), len(all_ids))
    todo = [scene_id for scene_id in all_ids if scene_id not in resumed]
    for scene_id in track(todo, "generating demo scenes", progress, unit="scene"):
        scene = generate_scene(
            seed=scene_seed(demo, scene_id),
            frames=demo.frames_per_scene,
            height=demo.height,
            width=demo.width,
            horizontal_fov_degrees=demo.horizontal_fov_degrees,
        )
        with atomic_directory(root / "scenes" / scene_id) as folder:
            write_scene(
                folder,
                names=[frame_file_name(index) for index in range(demo.frames_per_scene)],
                images=scene.images,
                intrinsics=scene.intrinsics,
                world_to_camera=scene.world_to_camera,
                instances=scene.instances,
                depth=scene.depth,
                semantics=scene.semantics,
                normals=scene.normals,
            )
    write_split_files(root, splits)
    (root / "metadata" / "semantic_classes.txt").write_text("".join(f"{name}\n" for name in SEMANTIC_CLASSES))
    write_text_atomic(
        manifest_path,
        json.dumps({**record, "complete": True, "splits": splits, "config": dump_sections(data=data, demo=demo)}, indent=1),
    )
    marker_path.unlink(missing_ok=True)
    return DemoDataResult(root, spec.key, skipped=False, generated=todo, resumed=resumed)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
