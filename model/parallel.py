"""Tensor-parallel context and collectives: the only file that touches torch.distributed.

Each runner owns its own process group object (built from a TCPStore, not the global default
group), so one process can hold several independent groups (tests) and nothing is ambient.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 300.0  # a collective waiting this long on a (hung, not dead) peer raises


@dataclass(slots=True)
class CommTimer:
    """Seconds spent in collectives (host-side wall time) and how many ran; rank 0 reads it."""

    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """Which shard this process holds; passed explicitly into every parallel layer."""

    rank: int = 0
    size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup; None at size 1 (or in shard tests)
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


def create_store(size: int, timeout_s: float = 300.0) -> Any:
    """Rank 0's rendezvous store on a free port of 127.0.0.1 (the OS picks it; read `.port`)."""
    import torch.distributed as dist

    return dist.TCPStore(
        "127.0.0.1", 0, size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
    )


def init_parallel(
    rank: int,
    size: int,
    device: torch.device,
    port: int,
    store: Any = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelContext:
    """Join the group (nccl on CUDA, gloo on CPU) through the store at 127.0.0.1:port."""
    if size == 1:
        return ParallelContext()
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=timedelta(seconds=300))
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, size, opts)
    else:
        group = dist.ProcessGroupGloo(store, rank, size, timeout)
    return ParallelContext(rank=rank, size=size, group=group)


def destroy_parallel(ctx: ParallelContext) -> None:
    """Release the group's connections (best effort: a dead peer must not block shutdown)."""
    if ctx.group is not None and hasattr(ctx.group, "shutdown"):
        try:
            ctx.group.shutdown()
        except RuntimeError:
            pass


def _timed(ctx: ParallelContext, launch: Callable[[], Any]) -> None:
    """Run a collective, wait for it and book its host time (NCCL only queues: time is launch)."""
    start = time.perf_counter()
    launch().wait()
    ctx.timer.seconds += time.perf_counter() - start
    ctx.timer.calls += 1


def all_reduce(x: torch.Tensor, ctx: ParallelContext, op: str = "sum") -> torch.Tensor:
    """Sum (or min/max) partial results across ranks in place; a no-op at size 1."""
    if ctx.size == 1:
        return x
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    opts.reduceOp = ops[op]
    _timed(ctx, lambda: ctx.group.allreduce([x], opts))
    return x


def gather_to_first(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """Every rank's shard concatenated along `dim` on rank 0; other ranks get an empty tensor."""
    if ctx.size == 1:
        return x
    import torch.distributed as dist

    x = x.contiguous()
    opts = dist.GatherOptions()
    opts.rootRank = 0
    if ctx.is_first:
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        _timed(ctx, lambda: ctx.group.gather([parts], [x], opts))
        return torch.cat(parts, dim=dim)
    _timed(ctx, lambda: ctx.group.gather([], [x], opts))
    return x.new_empty(*x.shape[:-1], 0) if dim in (-1, x.dim() - 1) else x.new_empty(0)


def all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's shard along `dim` on every rank; identity at size 1."""
    if ctx.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.size)]
    _timed(ctx, lambda: ctx.group.allgather([parts], [x]))
    return torch.cat(parts, dim=dim)
