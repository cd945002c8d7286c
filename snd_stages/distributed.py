"""Running ``snd train`` as several processes: torchrun's environment, the process group, per-rank helpers.

Usage::

    torchrun --nproc-per-node 4 -m snd_stages.cli train --config pipeline.yaml

torchrun starts one process per GPU and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each; across machines
its rendezvous does the same. :func:`process_group` reads them, joins the group (NCCL on CUDA, each process on
GPU ``LOCAL_RANK``; gloo on the CPU) and leaves it again, also on an error. Without them, or with
``WORLD_SIZE=1``, nothing is initialised and every helper here is a no-op: a single process computes exactly what
it computed before these helpers existed.

.. note::
    Conventions of a run of ``n`` processes (see ``snd_stages/stages/train.py``):

    - ``train.batch_size`` is the global batch: step ``s`` takes the same sample indices as a single process
      would, and rank ``r`` takes the ``r``-th of ``n`` equal consecutive slices of them;
    - each rank's loss is the mean over its own samples and DDP averages the gradients, so the update is the
      single-process update of the global batch up to float reduction order;
    - rank 0 alone writes files; checkpoints hold no per-rank state, so any run resumes with any ``n``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import ConfigError

_ENVIRONMENT = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: global rank, 0 .. size - 1; rank 0 writes every file.
        local_rank: rank on this machine; the GPU index on CUDA.
        size: number of processes (1 = not distributed).
        device: where this process computes (``cuda:<local_rank>`` on CUDA when distributed).
    """

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def local_batch_size(self, batch_size: int) -> int:
        """This rank's share of the global batch.

        Raises:
            ConfigError: the global batch does not split evenly over the processes.
        """
        if batch_size % self.size:
            raise ConfigError(
                f"train.batch_size = {batch_size} is the global batch, split evenly over the {self.size} processes, "
                f"but does not divide by {self.size}: use a multiple of {self.size}, or start as many processes as "
                "divide it"
            )
        return batch_size // self.size

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's consecutive slice of a step's global sample indices."""
        share = self.local_batch_size(len(indices))
        return list(indices[self.rank * share : (self.rank + 1) * share])

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of ``values`` over all ranks, on their device (one all-reduce, queued without
        waiting for it); ``values`` itself in a single process."""
        if not self.distributed:
            return values
        reduced = values.clone()
        dist.all_reduce(reduced)
        return reduced / self.size

    def barrier(self) -> None:
        """Wait until every rank gets here (e.g. until rank 0 has written what the others read)."""
        if self.distributed:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def seed_dropout(self, seed: int, start_step: int) -> None:
        """Give ranks 1 .. n-1 their own random streams; rank 0 keeps the stream a single process would have.

        Dropout noise then differs between the samples of different ranks, as it does between the samples of one
        process. Rank 0's stream is the one checkpointed; the others start afresh from (seed, rank, start_step),
        so the noise of a run depends on the number of processes and on where it was resumed (no effect with
        ``train.lora_dropout: 0``).
        """
        if self.rank > 0:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, start_step]).generate_state(1)[0]))

    def assert_replicas_agree(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Check that every rank holds bitwise the same ``tensors``; a no-op in a single process.

        Compares a float64 checksum per tensor (sum and sum of squares), gathered from every rank.

        Raises:
            RuntimeError: some rank's tensors differ from rank 0's.
        """
        if not self.distributed:
            return
        checksums = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                                 for t in tensors]).to(self.device)  # [T, 2]
        gathered = [torch.empty_like(checksums) for _ in range(self.size)]
        dist.all_gather(gathered, checksums)
        differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
        if differing:
            raise RuntimeError(f"{what} differ between rank 0 and ranks {differing}: the replicas diverged")


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone), from torchrun's ``RANK``, before any process group exists."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def world_from_environment(device: torch.device) -> World:
    """The world torchrun describes in ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; one process without them.

    Raises:
        ConfigError: only some of the three variables are set, or they are inconsistent.
    """
    present = [name for name in _ENVIRONMENT if name in os.environ]
    if not present:
        return World(device=device)
    if len(present) < len(_ENVIRONMENT):
        missing = sorted(set(_ENVIRONMENT) - set(present))
        raise ConfigError(f"{', '.join(present)} set but {', '.join(missing)} not: start several processes with "
                          "torchrun, which sets all three")
    try:
        size, rank, local_rank = (int(os.environ[name]) for name in _ENVIRONMENT)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers, got "
                          f"{[os.environ[name] for name in _ENVIRONMENT]}") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise ConfigError(f"WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local_rank}: need 0 <= RANK < WORLD_SIZE")
    if size > 1 and device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                              "start at most that many processes per machine (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
    return World(rank, local_rank, size, device)


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the training processes for the duration of the block; a single process joins nothing.

    On CUDA each process uses GPU ``LOCAL_RANK`` and the NCCL backend, elsewhere gloo. torchrun's ``MASTER_ADDR``
    and ``MASTER_PORT`` (set by its rendezvous) say where the processes meet. A group that the caller has
    initialised already is used and left for the caller to destroy.

    Args:
        device: the configured device (``train.device`` resolved); ``cuda`` becomes ``cuda:<LOCAL_RANK>``.

    Yields:
        This process's :class:`World`.
    """
    world = world_from_environment(device)
    if not world.distributed:
        yield world
        return
    joined_here = not dist.is_initialized()
    if joined_here:
        if world.device.type == "cuda":
            torch.cuda.set_device(world.device)
            dist.init_process_group("nccl", device_id=world.device)
        else:
            dist.init_process_group("gloo")
    assert (dist.get_rank(), dist.get_world_size()) == (world.rank, world.size), (
        f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment {world}"
    )
    try:
        yield world
    finally:
        if joined_here:
            dist.destroy_process_group()
