"""Tensor-parallel context and the collectives the layers use (all-reduce, gather to rank 0).

The rendezvous that builds the groups (store, join, heartbeats) is model/rendezvous.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(slots=True)
class CommTimer:
    """Seconds spent in collectives (host-side wall time); rank 0 reads it."""

    seconds: float = 0.0

    def reset(self) -> None:
        self.seconds = 0.0


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """Which shard this process holds; passed explicitly into every parallel layer."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None at size 1 (or in shard tests)
    local_size: int = 1  # ranks on this host (they share its RAM)
    timer: CommTimer = field(default_factory=CommTimer, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad tensor-parallel rank {self.rank} for size {self.size}")

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def shard(self, total: int, what: str = "dimension") -> int:
        """Size of this rank's equal slice of `total`; raises if it does not divide."""
        if total % self.size:
            raise ValueError(f"{what} {total} is not divisible by tensor_parallel_size {self.size}")
        return total // self.size


def _timed(ctx: ParallelContext, launch: Callable[[], Any]) -> None:
    """Run a collective, wait for it and book its host time (NCCL only queues: time is launch)."""
    start = time.perf_counter()
    launch().wait()
    ctx.timer.seconds += time.perf_counter() - start


def all_reduce(x: torch.Tensor, ctx: ParallelContext, op: str = "sum") -> torch.Tensor:
    """Sum (or min) partial results across ranks in place; a no-op at size 1."""
    if ctx.size == 1:
        return x
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM
    _timed(ctx, lambda: ctx.group.allreduce([x], opts))
    return x


def gather_to_first(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Every rank's shard concatenated along the last dim on rank 0; the others get [..., 0]."""
    if ctx.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    opts = dist.GatherOptions()
    opts.rootRank = 0
    if ctx.is_first:
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        _timed(ctx, lambda: ctx.group.gather([parts], [x], opts))
        return torch.cat(parts, dim=-1)
    _timed(ctx, lambda: ctx.group.gather([], [x], opts))
    return x.new_empty(*x.shape[:-1], 0)
