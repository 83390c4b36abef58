"""Tensor-parallel linear layers with vLLM's names; each parameter loads its own shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import gemv
from model.parallel import ParallelContext, all_reduce


def _param(*shape: int) -> nn.Parameter:
    """A parameter; 2-D weights are [out, in] row-major: the layout the decode GEMV streams."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


_ONEDNN = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def dense(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x W^T + b; on CPU float32, decode rows go to gemv.c and larger batches to oneDNN on a
    weight packed once (F.linear is the oracle).

    NOTE: on these CPUs oneDNN with a prepacked weight beats MKL's sgemm/sgemv by 15-35% at
    every batch size, and gemv.c beats oneDNN by ~50% for 1-2 rows. The packed copy lives on
    `owner` (not in its state_dict) and is rebuilt when the weight moves (data_ptr) or a
    weight_loader writes it (drop_packed).
    """
    if gemv.usable(x, weight, bias):
        return gemv.gemv(x, weight, bias)
    if not _ONEDNN or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        return F.linear(x, weight, bias)
    cache = owner.__dict__.get("_packed")
    if cache is None or cache[0] != weight.data_ptr():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        cache = owner.__dict__["_packed"] = (weight.data_ptr(), packed)
    return torch.ops.mkldnn._linear_pointwise(x, cache[1], bias, "none", [], "")


def drop_packed(owner: nn.Module) -> None:
    """Weight loaders call this: the next dense() repacks the new values."""
    owner.__dict__.pop("_packed", None)


def _copy(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows; each rank yields its slice of y."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx or ParallelContext()
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_rank = self.ctx.shard(output_size, "output size")
        self.weight = _param(self.output_size_per_rank, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.output_size_per_rank) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        drop_packed(self)
        rows = param.shape[0]
        _copy(param, loaded.narrow(0, self.ctx.rank * rows, rows), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(self, x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one GEMM (gate_up_proj); shard_id indexes output_sizes."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__(input_size, sum(output_sizes), bias, ctx)
        self.output_sizes = list(output_sizes)
        self.shard_names: list[int | str] = list(range(len(output_sizes)))
        for size in output_sizes:
            self.ctx.shard(size, "merged output size")

    def _offsets(self, shard_id: int | str) -> tuple[int, int]:
        """(offset, rows) of one merged part inside this rank's parameter."""
        sizes = [s // self.ctx.size for s in self.output_sizes]
        i = self.shard_names.index(shard_id)
        return sum(sizes[:i]), sizes[i]

    def _source_rows(self, shard_id: int | str, rows: int) -> int:
        """First row of this rank's slice inside the full checkpoint tensor of one part."""
        return self.ctx.rank * rows

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        drop_packed(self)
        if shard_id is None:  # an already-merged tensor (e.g. a saved gate_up_proj)
            return super().weight_loader(param, loaded)
        if shard_id not in self.shard_names:
            raise ValueError(f"{type(self).__name__}: unknown shard {shard_id!r}")
        offset, rows = self._offsets(shard_id)
        part = loaded.narrow(0, self._source_rows(shard_id, rows), rows)
        _copy(param.data.narrow(0, offset, rows), part, f"{type(self).__name__}[{shard_id}]")


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v in one GEMM; heads split across ranks, KV heads replicated if fewer."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        ctx: ParallelContext | None = None,
    ) -> None:
        ctx = ctx or ParallelContext()
        self.num_heads = ctx.shard(num_heads, "num_attention_heads")
        if num_kv_heads >= ctx.size:
            self.num_kv_heads = ctx.shard(num_kv_heads, "num_key_value_heads")
            self.kv_replicas = 1
        else:  # fewer KV heads than ranks: each rank keeps a copy of one KV head
            if ctx.size % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size {ctx.size} is not a multiple of "
                    f"num_key_value_heads {num_kv_heads}"
                )
            self.num_kv_heads, self.kv_replicas = 1, ctx.size // num_kv_heads
        self.head_dim = head_dim
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, [q * ctx.size, kv * ctx.size, kv * ctx.size], bias, ctx)
        self.shard_names = ["q", "k", "v"]

    def _source_rows(self, shard_id: int | str, rows: int) -> int:
        rank = self.ctx.rank if shard_id == "q" else self.ctx.rank // self.kv_replicas
        return rank * rows


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; each rank yields a partial sum.

    reduce=True all-reduces here; reduce=False leaves partial sums for the next ResidualRMSNorm,
    and then the bias is added on rank 0 only so that the later sum counts it once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce: bool = False,
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx or ParallelContext()
        self.reduce = reduce
        self.input_size_per_rank = self.ctx.shard(input_size, "input size")
        self.weight = _param(output_size, self.input_size_per_rank)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(output_size) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        drop_packed(self)
        if param.dim() == 2:
            cols = param.shape[1]
            loaded = loaded.narrow(1, self.ctx.rank * cols, cols)
        _copy(param, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return dense(self, x, self.weight, self.bias)
        y = dense(self, x, self.weight, None)
        if self.reduce:
            y = all_reduce(y, self.ctx)
        if self.bias is not None and (self.reduce or self.ctx.is_first):
            y = y + self.bias
        return y
