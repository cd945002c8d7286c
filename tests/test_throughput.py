"""The stages' read / compute / write overlap: every unit computed in order and written whole, failures raised
after the writes in flight finish, and the stored artifacts byte for byte those of a serial run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from snd_stages import store as store_module
from snd_stages import throughput
from snd_stages.artifacts.gaussians import load_gaussians
from snd_stages.artifacts.masks import load_masks
from snd_stages.artifacts.operators import load_operators
from snd_stages.artifacts.samples import load_samples
from snd_stages.stages.precompute_gaussians import precompute_gaussians
from snd_stages.stages.precompute_masks import precompute_masks
from snd_stages.stages.precompute_operators import precompute_operators
from snd_stages.store import DATA, Store, list_units
from tests.conftest import build_demo_artifacts, build_demo_samples, tree_digest
from tests.test_splat_operator import config


def one_at_a_time(compute):
    """A computation of one item as a call of :func:`throughput.overlapped` (which passes lists of items)."""
    def call(batch, inputs):
        assert len(batch) == len(inputs) == 1
        return [compute(batch[0], inputs[0])]
    return call


def test_every_item_is_read_computed_in_order_and_written_once():
    computed, written, lock = [], {}, threading.Lock()

    def read(item):
        time.sleep(0.002 * (item % 3))  # reads finish out of order
        return item * 10

    def compute(item, value):
        computed.append(item)
        assert threading.current_thread() is threading.main_thread()  # the GPU's one stream stays in one thread
        return value + 1

    def write(item, result):
        time.sleep(0.001 * (item % 2))
        with lock:
            assert item not in written
            written[item] = result

    done = list(throughput.overlapped(range(20), read, one_at_a_time(compute), write, ahead=3))
    assert computed == list(range(20)) and sorted(done) == list(range(20))
    assert written == {item: item * 10 + 1 for item in range(20)}
    with throughput.serial():
        written.clear()
        computed.clear()
        assert list(throughput.overlapped(range(5), read, one_at_a_time(compute), write)) == list(range(5))
    assert computed == list(range(5))


def test_calls_take_consecutive_items_while_each_item_is_read_and_written_on_its_own(monkeypatch):
    monkeypatch.setattr(throughput, "available_cores", lambda: 16)  # 8 reading and 8 writing threads
    calls, written, threads_used, lock = [], {}, set(), threading.Lock()

    def read(item):
        with lock:
            threads_used.add(threading.current_thread().name)
        time.sleep(0.002 * (item % 3))
        return item * 10

    def compute(batch, inputs):
        assert threading.current_thread() is threading.main_thread()
        assert inputs == [item * 10 for item in batch]
        calls.append(list(batch))
        return [value + 1 for value in inputs]

    def write(item, result):
        time.sleep(0.001)
        with lock:
            assert item not in written
            written[item] = result

    done = list(throughput.overlapped(range(23), read, compute, write, per_call=5, ahead=4))
    assert calls == [list(range(start, min(start + 5, 23))) for start in range(0, 23, 5)]
    assert sorted(done) == list(range(23)) and written == {item: item * 10 + 1 for item in range(23)}
    assert len(threads_used) > 1  # a call's items were read in parallel
    written.clear()
    with throughput.recording() as phases:
        list(throughput.overlapped(range(23), read, compute, write, per_call=5))
    assert dict(phases.counts) == {"read": 23, "compute": 5, "write": 23}


def test_a_failed_write_is_raised_after_the_writes_in_flight_finish():
    finished = []

    def write(item, result):
        if item == 3:
            raise OSError("disk full")
        time.sleep(0.01)
        finished.append(item)

    with pytest.raises(OSError, match="disk full"):
        for _ in throughput.overlapped(range(30), lambda item: item, one_at_a_time(lambda item, value: value), write,
                                       ahead=4):
            pass
    assert 3 not in finished and {0, 1, 2} <= set(finished) and len(finished) < 29
    settled = len(finished)
    time.sleep(0.1)
    assert len(finished) == settled  # nothing still writing behind the error


def test_a_failed_read_stops_the_run():
    def read(item):
        if item == 5:
            raise ValueError("unreadable frame")
        return item

    written = []
    with pytest.raises(ValueError, match="unreadable frame"):
        list(throughput.overlapped(range(10), read, one_at_a_time(lambda item, value: value),
                                  lambda item, value: written.append(item)))
    assert 5 not in written and set(written) <= {0, 1, 2, 3, 4}


def test_a_cpu_computing_stage_overlaps_only_with_cores_to_spare(monkeypatch):
    monkeypatch.setattr(throughput, "available_cores", lambda: 2)
    assert throughput.io_threads("cpu") == 0 and throughput.io_threads("cuda") == 1
    monkeypatch.setattr(throughput, "available_cores", lambda: 16)
    assert throughput.io_threads("cpu") == 2 and throughput.io_threads("cuda") == 8


def test_phases_are_recorded_only_inside_recording():
    with throughput.phase("compute"):
        pass  # no recorder: nothing to record into
    with throughput.recording() as phases:
        list(throughput.overlapped(range(4), lambda item: item, one_at_a_time(lambda item, value: value),
                                  lambda item, value: None))
    assert dict(phases.counts) == {"read": 4, "compute": 4, "write": 4}
    assert all(seconds >= 0 for seconds in phases.seconds.values())


def unit_files(store: Path, stage: str) -> dict[str, str]:
    """Every file of every unit (the root group names the artifact's key, which covers the scenes' file times)."""
    (artifact,) = [path for path in (store / stage).iterdir() if not path.name.startswith(".")]
    return {name: digest for name, digest in tree_digest(artifact / DATA).items() if "/" in name}


@pytest.mark.filterwarnings("ignore:random weights")
def test_overlapped_stages_store_the_bytes_of_a_serial_run(tmp_path, monkeypatch):
    more = ["sampling.samples_per_scene=6", "demo.frames_per_scene=12", "demo.train_scenes=2"]  # several units each
    serial_cfg = config(tmp_path / "serial", *more)
    with throughput.serial():
        build_demo_artifacts(serial_cfg, operators=True)
    cfg = config(tmp_path / "overlapped", *more)
    # these stages compute on the CPU here, which leaves threads for reading and writing only with cores to spare
    monkeypatch.setattr(throughput, "CORES_TO_SPARE_FOR_IO", 1)
    assert throughput.io_threads("cpu") >= 1  # so the stages below overlap
    # and reconstruct and compose several units per call, as on a GPU
    monkeypatch.setattr(throughput, "BATCHED_DEVICES", ("cuda", "cpu"))
    store = build_demo_samples(cfg)
    with throughput.recording() as phases:
        precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store)
    assert phases.counts["compute"] < phases.counts["write"] / 2  # the calls did take several pairs
    precompute_masks(cfg.data, cfg.sampling, cfg.masks, store)
    with throughput.recording() as phases:
        precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    assert phases.counts["compute"] < phases.counts["write"] / 2  # ... and several samples
    serial_store, store = Path(serial_cfg.store.root), Path(cfg.store.root)
    for stage in ("gaussians", "masks", "operators"):
        files = unit_files(store, stage)
        assert len(files) > 10 and files == unit_files(serial_store, stage), stage
    # and they read back as what the next stages read
    samples_artifact, _ = load_samples(Store(store), cfg.data, cfg.sampling)
    gaussians = load_gaussians(Store(store), cfg.gaussians, samples_artifact.key)
    masks = load_masks(Store(store), cfg.masks, samples_artifact.key)
    operators = load_operators(Store(store), cfg.train, samples_artifact.key, gaussians.key, masks.key)
    assert len(operators.units()) >= 4 and len(gaussians.units()) >= 4
    assert precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, Store(store)).skipped
    assert precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, Store(store)).skipped


def test_the_unit_writers_store_the_same_bytes_as_before(tmp_path, monkeypatch):
    """write_pair and write_operator on fixed synthetic inputs: every stored file's sha256, against the listing the
    writers gave before the overlap and the single attribute write (a change here changes stored artifacts; the
    Gaussians' codec and packing and the operators' packing changed it, each with its schema version; the values are
    the same: the test below and tests/test_splat_operator.py)."""
    import hashlib

    import numpy as np
    import torch

    from snd_stages.artifacts.gaussians import pair_unit, write_pair
    from snd_stages.artifacts.operators import write_operator
    from snd_stages.gaussians import Gaussians
    from snd_stages.scenes.layout import read_scene
    from snd_stages.splat.operator import SplatOperator
    from snd_stages.store import ArtifactSpec
    from tests.scannetpp_fixture import write_fixture

    write_fixture(tmp_path, "scene", frame_numbers=(1, 2, 3))
    scene = read_scene(tmp_path, "scene")
    generator = torch.Generator().manual_seed(0)
    count = 5000
    quats = torch.nn.functional.normalize(torch.rand(count, 4, generator=generator) - 0.5, dim=-1)
    gaussians = Gaussians(means=torch.rand(count, 3, generator=generator) * 4, quats=quats,
                          scales=torch.rand(count, 3, generator=generator) * 0.01 + 1e-3,
                          opacities=torch.rand(count, generator=generator),
                          source_view=torch.randint(0, 2, (count,), generator=generator),
                          source_pixel=torch.randint(0, 1000, (count,), generator=generator))
    rng = np.random.default_rng(0)

    def csr(rows, columns, density):
        dense = (rng.random((rows, columns)) < density) * rng.random((rows, columns)).astype(np.float32)
        return torch.from_numpy(dense.astype(np.float32)).to_sparse_csr()

    operator = SplatOperator(local=csr(20, 60, 0.1), segment_means=csr(5, 60, 0.2), segment_spread=csr(20, 5, 0.3),
                             coverage=torch.from_numpy(rng.random((4, 5)) < 0.5), context_grid=(4, 6))
    writer = Store(tmp_path / "store").writer(ArtifactSpec("pin", 1, {}), "")
    writer.prepare()
    writer.write_unit("pair", pair_unit(scene, (0, 1), [2], gaussians))  # encoded in memory, then written
    write_operator(writer, "operator", operator, "scene", (0, 1), 2)

    def listing(*units: str, within: Path = writer.data) -> str:
        return "".join(f"{path.relative_to(within)} {hashlib.sha256(path.read_bytes()).hexdigest()[:16]}\n"
                       for unit in units for path in sorted((writer.data / unit).rglob("*")) if path.is_file())

    assert listing("operator", "pair").count("\n") == 20
    assert hashlib.sha256(listing("operator", "pair").encode()).hexdigest()[:20] == "dc4e5c16c8505402c1a6"
    with writer.unit("pair-file-by-file") as group:  # Zarr writing to disk as it goes: the same files
        write_pair(group, scene, (0, 1), [2], gaussians)
    monkeypatch.setattr(store_module, "MOST_BYTES_THROUGH_MEMORY", 0)  # ... as write_unit does for a large unit
    writer.write_unit("pair-large", pair_unit(scene, (0, 1), [2], gaussians))
    for other in ("pair-file-by-file", "pair-large"):
        assert listing(other, within=writer.data / other) == listing("pair", within=writer.data / "pair")


def test_a_pair_reads_back_as_the_eleven_arrays_of_schema_2_did(tmp_path):
    """Schema 3 of the Gaussians packs the per-Gaussian fields into three arrays and the cameras into the attributes;
    a unit reads back bit for bit what schema 2 stored: positions in float32, rotations, scales and opacities rounded
    to float16, the source indices, and the scenes' float64 cameras."""
    import torch
    import zarr

    from snd_stages.artifacts.gaussians import read_pair, write_pair
    from snd_stages.gaussians import Gaussians
    from snd_stages.scenes.layout import read_scene
    from tests.scannetpp_fixture import write_fixture

    write_fixture(tmp_path, "scene", frame_numbers=(1, 2, 3, 4))
    scene = read_scene(tmp_path, "scene")
    generator = torch.Generator().manual_seed(1)
    count = 70000  # over a Blosc block, with values of every exponent the stages store
    gaussians = Gaussians(means=torch.randn(count, 3, generator=generator) * 3,
                          quats=torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1),
                          scales=torch.rand(count, 3, generator=generator) * 0.05,
                          opacities=torch.rand(count, generator=generator),
                          source_view=torch.randint(0, 2, (count,), generator=generator),
                          source_pixel=torch.randint(0, 1 << 20, (count,), generator=generator))
    group = zarr.open_group(store=str(tmp_path / "pair.zarr"), mode="w", zarr_format=3)
    write_pair(group, scene, (0, 1), [2, 3], gaussians)
    pair = read_pair(zarr.open_group(store=str(tmp_path / "pair.zarr"), mode="r"))

    def same(value: torch.Tensor, expected: torch.Tensor) -> bool:
        return value.dtype == expected.dtype and value.shape == expected.shape and torch.equal(value, expected)

    half = lambda x: x.to(torch.float16).to(torch.float32)  # noqa: E731
    read = pair.gaussians
    assert same(read.means, gaussians.means) and same(read.quats, half(gaussians.quats))
    assert same(read.scales, half(gaussians.scales)) and same(read.opacities, half(gaussians.opacities))
    assert same(read.source_view, gaussians.source_view) and same(read.source_pixel, gaussians.source_pixel)
    for camera, positions in ((pair.context_camera, [0, 1]), (pair.target_camera, [2, 3])):
        assert same(camera.intrinsics, scene.camera[positions].intrinsics)
        assert same(camera.world_to_camera, scene.camera[positions].world_to_camera)
        assert (camera.height, camera.width) == (scene.camera.height, scene.camera.width)
    assert pair.target_positions == [2, 3] and pair.context_positions == (0, 1) and pair.scene == "scene"
    assert sorted(name for name, _ in group.arrays()) == ["means", "shape", "source"]
    assert all(type(array.compressors[0]).__name__ == "BloscCodec" for _, array in group.arrays())


def test_ordered_map_keeps_order_and_runs_at_most_ahead_items_in_front():
    started, lock = [], threading.Lock()

    def slow(item):
        with lock:
            started.append(item)
        time.sleep(0.003 * (item % 4))
        return item * item

    results = []
    for value in throughput.ordered_map(slow, range(40), ahead=5):
        with lock:
            assert len(started) <= len(results) + 1 + 5  # never more than `ahead` beyond what was consumed
        results.append(value)
    assert results == [item * item for item in range(40)]


def test_the_processes_a_stage_computes_in(monkeypatch):
    monkeypatch.setattr(throughput, "available_cores", lambda: 16)
    assert throughput.unit_processes(0, 1000, "cuda") == 4  # one per 4 cores beside a GPU
    assert throughput.unit_processes(0, 250, "cuda") == 2  # ... each with enough units to pay for its start
    assert throughput.unit_processes(0, 1000, "cpu") == 1  # torch's threads already use every core
    assert throughput.unit_processes(3, 2, "cpu") == 2  # as asked, at most one per unit
    assert throughput.unit_processes(0, 1000, "cuda", shards=4) == 1  # shards already divide the machine
    assert throughput.unit_processes(2, 1000, "cuda", shards=4) == 2
    with throughput.serial():
        assert throughput.unit_processes(3, 1000, "cuda") == 1


@pytest.mark.filterwarnings("ignore:random weights")
def test_stages_computed_in_several_processes_store_the_bytes_of_one(tmp_path):
    more = ["sampling.samples_per_scene=6", "demo.frames_per_scene=12", "demo.train_scenes=2"]
    one_cfg = config(tmp_path / "one", *more)
    build_demo_artifacts(one_cfg, operators=True)  # on this CPU: one process
    cfg = config(tmp_path / "two", *more)
    store = build_demo_samples(cfg)
    with throughput.recording() as phases:
        precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store, workers=2)
    pairs = len(load_gaussians(store, cfg.gaussians, load_samples(store, cfg.data, cfg.sampling)[0].key).units())
    assert pairs >= 4 and phases.counts["compute"] == phases.counts["write"] == pairs  # recorded by the workers
    precompute_masks(cfg.data, cfg.sampling, cfg.masks, store)
    precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store, workers=2)
    for stage in ("gaussians", "operators"):
        files = unit_files(Path(cfg.store.root), stage)
        assert len(files) > 10 and files == unit_files(Path(one_cfg.store.root), stage), stage


def test_a_failure_in_a_worker_process_is_raised_and_the_other_units_kept(tmp_path):
    from snd_stages.errors import DataError

    cfg = config(tmp_path, "sampling.samples_per_scene=6", "demo.frames_per_scene=12", "demo.train_scenes=2")
    store = build_demo_samples(cfg)
    (scene, *_) = sorted((Path(cfg.data.root) / "scenes").iterdir())
    for frame in (scene / "images").iterdir():  # the first worker's share: the first scene's pairs
        stat = frame.stat()  # damaged in place: same size and time, so the samples still match the scenes
        frame.write_bytes(bytes(stat.st_size))
        os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=scene.name):
        precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store, workers=2)
    (partial,) = (Path(cfg.store.root) / "gaussians").glob("*.partial")
    assert len(list_units(partial / DATA)) >= 1  # the other worker's units stay, whole, for a rerun


PARENT_WITH_WORKERS = """
import os, sys, time
from snd_stages.runtime import process_pool

def wait_forever(path):
    with open(path + ".tmp", "w") as handle:
        handle.write(f"{os.getpid()} {os.getppid()}")
    os.rename(path + ".tmp", path)
    time.sleep(600)

if __name__ == "__main__":
    with process_pool(2, 1, preload=sys.argv[2:]) as pool:
        for worker in range(2):
            pool.submit(wait_forever, os.path.join(sys.argv[1], str(worker)))
        time.sleep(600)
"""


@pytest.mark.parametrize("preload", [["json"], []], ids=["fork server", "spawned"])
def test_workers_die_with_their_parent(tmp_path, preload):
    import signal
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(PARENT_WITH_WORKERS)
    repository = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repository), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path), *preload], env=environment)
    try:
        reports = [tmp_path / "0", tmp_path / "1"]
        deadline = time.monotonic() + 120
        while not all(report.exists() for report in reports):
            assert parent.poll() is None and time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
        workers, servers = zip(*(map(int, report.read_text().split()) for report in reports))
        assert len(set(workers)) == 2
        assert len(set(servers)) == 1  # one fork server, or the parent
        assert (servers[0] != parent.pid) == bool(preload)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # a dead child of the server not yet reaped (a zombie) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its killed parent"
        time.sleep(0.1)


def test_the_depth_gaussians_never_decode_the_colours(tmp_path, monkeypatch):
    from snd_stages.scenes.layout import Scene

    cfg = config(tmp_path, "sampling.samples_per_scene=4", "demo.frames_per_scene=12", "demo.train_scenes=2")
    store = build_demo_samples(cfg)

    def no_colours(self, index):
        raise AssertionError("the depth reconstructor decoded a colour image")

    monkeypatch.setattr(Scene, "load_image", no_colours)
    result = precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store)
    assert len(result.artifact.units()) >= 4
