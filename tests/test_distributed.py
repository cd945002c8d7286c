"""snd train as several processes (torchrun, gloo on the CPU): the same weights as one process, any-size resume.

Two processes with a global batch of 2 (one sample each) must end where one process with a batch of 2 ends, up
to float reduction order: DDP sums the two ranks' gradients of their own one-sample means and halves the sum,
where one process backpropagates the mean over both samples at once. Those differ in the last bits of the
gradient, and three Adam steps carry that into the weights. Measured on two CPU cores (torch 2.15): 1.9e-9 on the
exported student, 3.7e-9 on the exported teacher, 2.2e-7 on the checkpointed LoRA and head tensors (the largest
on the head's prototype directions, entries up to 0.06), while one step moves those tensors by 4.7e-4. The
comparisons allow ``TOLERANCE`` = 1e-5, and check that a step moves the tensors by more than 20 times that.
LoRA dropout is off (``train.lora_dropout=0``): its noise depends on the number of processes (see
:meth:`snd_stages.distributed.World.seed_dropout`). The replicas' agreement (student and EMA teacher bitwise equal
on every rank) is checked by the run itself at its end (:meth:`snd_stages.distributed.World.assert_replicas_agree`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snd_stages.config import dump_yaml
from snd_stages.distributed import World, world_from_environment
from snd_stages.errors import ConfigError
from snd_stages.artifacts.runs import checkpoint_path, latest_checkpoint
from tests import test_train
from tests.test_train import config, read_metric, run

project = test_train.project  # fixture: tiny demo data and every input of a training run
# EMA every step with momentum 0.5, so that the teacher moves too; learning rate large enough to move the weights.
SETTINGS = ("train.steps=3", "train.batch_size=2", "train.lora_dropout=0", "train.learning_rate=1e-3",
            "train.ema_every=1", "train.ema_momentum=0.5", "train.device=cpu", "train.checkpoint_every=2",
            "train.keep_checkpoints=3")
TOLERANCE = 1e-5
EXPORTS = ("student.safetensors", "teacher.safetensors")


@contextmanager
def one_thread():
    """Each torchrun worker computes with one thread (OMP_NUM_THREADS=1); so does the single process compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun(args: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node <processes> <args>`` on the CPU; fails the test on a non-zero exit."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(command)} exited with {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result


def train_with_torchrun(project: Path, runs_root: Path, *extra: str) -> Path:
    """``snd train`` as two processes; returns the run directory."""
    path = runs_root.parent / f"{runs_root.name}.yaml"
    path.write_text(dump_yaml(config(project, *SETTINGS, f"train.runs_root={runs_root}", *extra)))
    torchrun(["-m", "snd_stages.cli", "train", "--config", str(path)])
    (run_dir,) = [path for path in runs_root.iterdir() if path.is_dir()]
    return run_dir


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a)


def trained_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """LoRA matrices and heads of both student and teacher, from a checkpoint."""
    return torch.load(checkpoint_path(run_dir, step), map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_process(project):
    with one_thread():
        return run(project, *SETTINGS, f"train.runs_root={project / 'runs-one-process'}").run_dir


@pytest.fixture(scope="module")
def two_processes(project):
    return train_with_torchrun(project, project / "runs-two-processes")


@pytest.mark.slow
def test_two_processes_end_on_the_weights_of_one_process_with_the_same_global_batch(one_process, two_processes):
    assert one_process.name == two_processes.name  # the number of processes is not part of the run's key
    for name in EXPORTS:
        assert max_difference(load_file(one_process / name), load_file(two_processes / name)) < TOLERANCE, name
    for step in (2, 3):
        assert max_difference(trained_tensors(one_process, step), trained_tensors(two_processes, step)) < TOLERANCE
    # Rank 0 logs the global batch's mean loss, and wrote every step's metrics once.
    assert read_metric(two_processes, "step") == [1, 2, 3]
    torch.testing.assert_close(read_metric(two_processes, "loss"), read_metric(one_process, "loss"), rtol=1e-5, atol=0)
    # The tolerance is far below what a step changes.
    assert max_difference(trained_tensors(one_process, 2), trained_tensors(one_process, 3)) > 20 * TOLERANCE


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_in_one(project, one_process, two_processes, tmp_path):
    runs_root = tmp_path / "runs"
    shutil.copytree(two_processes, runs_root / two_processes.name)
    run_dir = runs_root / two_processes.name
    (run_dir / "manifest.json").unlink()
    checkpoint_path(run_dir, 3).unlink()
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 2)
    with one_thread():
        resumed = run(project, *SETTINGS, f"train.runs_root={runs_root}")
    assert resumed.start_step == 2 and not resumed.skipped
    for name in EXPORTS:
        assert max_difference(load_file(one_process / name), load_file(run_dir / name)) < TOLERANCE, name


_REPLICA_CHECK = '''
import torch
from snd_stages.distributed import process_group

with process_group(torch.device("cpu")) as world:
    assert world.size == 2 and world.mean(torch.tensor([float(world.rank), 1.0])).tolist() == [0.5, 1.0]
    assert world.shard([10, 11, 12, 13]) == [[10, 11], [12, 13]][world.rank]
    tensors = [torch.arange(6.0).reshape(2, 3), torch.ones(4)]
    world.assert_replicas_agree(tensors, "the test tensors")
    if world.rank == 1:
        tensors[0][1, 2] = torch.nextafter(tensors[0][1, 2], torch.tensor(10.0))  # one ulp
    try:
        world.assert_replicas_agree(tensors, "the test tensors")
    except RuntimeError as error:
        assert "the test tensors differ between rank 0 and ranks [1]" in str(error), error
        print(f"rank {world.rank}: divergence found")
'''


def test_replicas_that_diverge_by_one_ulp_are_found_on_every_rank(tmp_path):
    script = tmp_path / "replica_check.py"
    script.write_text(_REPLICA_CHECK)
    output = torchrun([str(script)], timeout=120).stdout
    assert "rank 0: divergence found" in output and "rank 1: divergence found" in output, output


def test_the_global_batch_must_split_evenly_over_the_processes():
    with pytest.raises(ConfigError, match=r"train.batch_size = 6 is the global batch.*use a multiple of 4"):
        World(rank=1, size=4).local_batch_size(6)
    assert World(rank=1, size=3).local_batch_size(6) == 2
    indices = [4, 1, 3, 0, 2, 5]
    assert [i for rank in range(3) for i in World(rank=rank, size=3).shard(indices)] == indices


def test_torchrun_environment_is_detected(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world_from_environment(torch.device("cpu")) == World()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="LOCAL_RANK not"):
        world_from_environment(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_environment(torch.device("cpu")) == World(3, 1, 4, torch.device("cpu"))
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="need 0 <= RANK < WORLD_SIZE"):
        world_from_environment(torch.device("cpu"))
