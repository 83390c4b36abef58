"""Tensor-parallel linear layers with vLLM's names; each parameter loads its own shard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import gemv, kernels
from model.layers.qdot import BlockTensor, cat_blocks, qx_linear
from model.layers.quant import QuantTensor, cat_rows, qlinear
from model.parallel import ParallelContext, all_reduce


def _param(loader, *shape: int) -> nn.Parameter:
    """A parameter loaded by `loader`; 2-D weights are [out, in] row-major (the GEMV's layout)."""
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader
    return param


_ONEDNN = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def dense(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x W^T + b; on CPU float32, decode rows go to gemv.c (~50% faster at 1-2 rows) and larger
    batches to oneDNN on a weight packed once (15-35% faster than MKL); F.linear is the oracle.

    NOTE: the packed copy lives on `owner` (not in its state_dict) and is rebuilt when the weight
    moves (data_ptr) or a weight_loader writes it (drop_packed).
    """
    packed = owner.__dict__.get("quant")
    if isinstance(packed, BlockTensor):
        return qx_linear(x, packed, bias)
    if packed is not None:
        return qlinear(x, packed, bias)
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


def keeps_packed(param: torch.Tensor | None) -> bool:
    """Packed weights serve CPU float32 models where the C kernels multiply them; other dtypes
    and devices, and a host without the kernels, get float copies dequantized once at load
    (never again per call)."""
    return (
        param is not None
        and param.device.type == "cpu"
        and param.dtype == torch.float32
        and kernels.load() is not None
    )


def install_packed(owner: nn.Module, packed: QuantTensor, name: str) -> None:
    """Make `owner` compute with `packed`: its float weight is dropped, not kept beside it (GGUF
    blocks are repacked for the int8 kernels, in the same bytes)."""
    weight = owner.weight
    if weight is not None and tuple(weight.shape) != packed.shape:
        raise ValueError(f"{name}: expected shape {tuple(weight.shape)}, got {packed.shape}")
    if isinstance(packed, BlockTensor):
        packed.pack()
    drop_packed(owner)
    owner.quant = packed
    owner.weight = None


def packed_nbytes(model: nn.Module) -> int:
    """Bytes of every packed weight in `model` (float parameters are counted separately)."""
    return sum(m.quant.nbytes for m in model.modules() if getattr(m, "quant", None) is not None)


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
        self.weight = _param(self.weight_loader, self.output_size_per_rank, input_size)
        self.bias = _param(self.weight_loader, self.output_size_per_rank) if bias else None
        self.quant: QuantTensor | None = None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | QuantTensor, shard_id=None
    ) -> None:
        drop_packed(self)
        rows = self.output_size_per_rank  # weight and bias alike
        part = (
            loaded.narrow_rows(self.ctx.rank * rows, rows)
            if isinstance(loaded, QuantTensor)
            else loaded.narrow(0, self.ctx.rank * rows, rows)
        )
        if isinstance(part, QuantTensor):
            if keeps_packed(param):
                return install_packed(self, part, type(self).__name__)
            part = part.dequantize()
        _copy(param, part, type(self).__name__)

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
        self._float_parts: set = set()  # parts loaded as float: packed parts dequantize too
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
        self, param: nn.Parameter, loaded: torch.Tensor | QuantTensor, shard_id=None
    ) -> None:
        drop_packed(self)
        if shard_id is None:  # an already-merged tensor (e.g. a saved gate_up_proj)
            return super().weight_loader(param, loaded)
        if shard_id not in self.shard_names:
            raise ValueError(f"{type(self).__name__}: unknown shard {shard_id!r}")
        name = f"{type(self).__name__}[{shard_id}]"
        offset, rows = self._offsets(shard_id)
        start = self._source_rows(shard_id, rows)
        if isinstance(loaded, QuantTensor):
            return self._stash(param, shard_id, loaded.narrow_rows(start, rows), name)
        if param is self.weight:
            self._float_parts.add(shard_id)
        _copy(param.data.narrow(0, offset, rows), loaded.narrow(0, start, rows), name)

    def _stash(self, param: nn.Parameter, shard_id, part: QuantTensor, name: str) -> None:
        """Packed parts wait until all arrived, then merge in their widest common format; any
        float part (or a dtype that is not packed) makes them dequantize into the float weight."""
        if part.shape[1] != self.input_size:
            raise ValueError(f"{name}: expected {self.input_size} columns, got {part.shape[1]}")
        parts = self.__dict__.setdefault("_parts", {})
        parts[shard_id] = part
        if len(parts) < len(self.shard_names):
            return
        del self.__dict__["_parts"]
        if keeps_packed(param) and not self._float_parts:
            ordered = [parts[k] for k in self.shard_names]
            blocks = all(isinstance(p, BlockTensor) for p in ordered)
            return install_packed(self, cat_blocks(ordered) if blocks else cat_rows(ordered), name)
        for k, p in parts.items():
            offset, rows = self._offsets(k)
            _copy(param.data.narrow(0, offset, rows), p.dequantize(), name)


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
    """y = x W^T + b with W split by input columns; reduce=False leaves partial sums for the next
    ResidualRMSNorm (then rank 0 alone adds the bias, so that the sum counts it once)."""

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
        self.weight = _param(self.weight_loader, output_size, self.input_size_per_rank)
        self.bias = _param(self.weight_loader, output_size) if bias else None
        self.quant: QuantTensor | None = None

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | QuantTensor, shard_id=None
    ) -> None:
        drop_packed(self)
        name = type(self).__name__
        if isinstance(loaded, QuantTensor):
            cols = self.input_size_per_rank
            part = loaded.narrow_cols(self.ctx.rank * cols, cols)
            if part is not None and keeps_packed(param):
                return install_packed(self, part, name)
            loaded = loaded.dequantize()  # a shard that splits groups: float for this layer
        if loaded.dim() == 2:
            cols = self.input_size_per_rank
            loaded = loaded.narrow(1, self.ctx.rank * cols, cols)
        _copy(param, loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return dense(self, x, self.weight, self.bias)
        y = dense(self, x, self.weight, None)
        if self.reduce:
            y = all_reduce(y, self.ctx)
        if self.bias is not None and (self.reduce or self.ctx.is_first):
            y = y + self.bias
        return y
