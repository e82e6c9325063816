"""Sharding the analysis over processes started by ``torchrun`` (torch.distributed: gloo on CPU, NCCL on GPU).

Ranks share nothing but the file system: each measures its round-robin share of the work items into its own
cache file, and rank 0 merges the files after a barrier. A single process (no ``WORLD_SIZE`` > 1 in the
environment) gets a context of size one whose barriers do nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed"]

T = TypeVar("T")


@dataclass
class DistContext:
    """This process's place in the group.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU under NCCL).
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (single process).
        owned: whether :func:`init_distributed` created the process group (and :meth:`close` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: runs calibration and the shared setup, merges the results and writes the outputs."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The GPU of this rank under NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.world_size > 1:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def shard(self, items: list[T]) -> list[T]:
        """This rank's round-robin share of ``items`` (every rank must pass the same list)."""
        return items[self.rank::self.world_size]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (a one-element list in a single process)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
        self.owned = False


def init_distributed(timeout_s: float = 86400.0, backend: str | None = None) -> DistContext:
    """Join the ``torchrun`` process group when the environment asks for one.

    Reuses a group the caller already initialised. Otherwise, with ``WORLD_SIZE`` > 1 (and ``RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT`` as torchrun sets them), initialises ``backend``.

    Args:
        timeout_s: how long a barrier waits for the slowest rank; ranks finish their shares at different times
            and a full-size analysis takes hours, so the default is one day.
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available (one GPU per local rank), else gloo.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), owned=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, owned=True)
