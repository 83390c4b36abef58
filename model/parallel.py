"""Tensor-parallel context and collectives: the only file that touches torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """Which shard this process holds; passed explicitly into every parallel layer."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None at size 1 (or in shard tests)

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


def init_parallel(rank: int, size: int, backend: str, init_method: str) -> ParallelContext:
    """Join the process group (nccl on CUDA, gloo on CPU) and return this rank's context."""
    if size == 1:
        return ParallelContext()
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)
    return ParallelContext(rank=rank, size=size, group=dist.group.WORLD)


def destroy_parallel(ctx: ParallelContext) -> None:
    if ctx.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Sum partial results across ranks in place; a no-op at size 1."""
    if ctx.size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=ctx.group)
    return x


def all_gather(x: torch.Tensor, ctx: ParallelContext, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's shard along `dim`; identity at size 1."""
    if ctx.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(ctx.size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.group)
    return torch.cat(parts, dim=dim)
