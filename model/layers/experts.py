"""Routed experts' weights: one [E, out, in] tensor per projection for every expert, TP-sharded
along the expert intermediate dimension, and products whose rows never depend on each other.

Row invariance (one token's output is the same bits whatever shares its experts): float weights
multiply each row as its own 1 x in product (a batched GEMM of M=1 items: measured bitwise equal
for any batch, where F.linear over a group of rows is not, MKL choosing kernels by row count);
packed GGUF blocks go through qdot.c's int8 kernel (activations quantized per row, integer dot
products) or quant.c's qgemm (row-invariant at every row count). Each expert's rows are one
call: its weights are read once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.linear import keeps_packed
from model.layers.qdot import BlockTensor, cat_blocks, qx_linear
from model.layers.quant import QuantTensor, cat_rows, qlinear
from model.parallel import ParallelContext


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ weight[out, in]^T -> [n, out], each row its own product (row-invariant)."""
    n = x.shape[0]
    if n == 0:
        return x.new_empty(0, weight.shape[0])
    w = weight.t().unsqueeze(0).expand(n, -1, -1)  # [n, in, out], no copy
    return torch.bmm(x.unsqueeze(1), w).squeeze(1)


def packed_linear(x: torch.Tensor, w: QuantTensor) -> torch.Tensor:
    """x [n, in] @ dequantize(w)^T with a row-invariant kernel (see the module docstring)."""
    if isinstance(w, BlockTensor):
        return qx_linear(x, w, None)
    return qlinear(x, w, None)


class PackedExperts(tuple):
    """Every expert's packed weight, indexed by expert id (built once at load)."""

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self)


class ReplicatedLinear(nn.Module):
    """A small weight every rank holds whole (the router, Qwen2-MoE's shared-expert gate);
    packed checkpoint tensors are dequantized (routers are kept float32 in GGUF files)."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if isinstance(loaded, QuantTensor):
            loaded = loaded.dequantize()
        if loaded.dim() == 1 and loaded.numel() == param.numel():  # a GGUF's [hidden] gate
            loaded = loaded.view(param.shape)
        if param.shape != loaded.shape:
            raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(loaded.shape)}")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rowwise_linear(x, self.weight)


class ExpertLinear(nn.Module):
    """Every expert's projection as one [E, out, in] parameter. column=True (gate_up): each rank
    holds its rows of every expert's parts; column=False (down): its input columns, so the
    products are partial sums for the next ResidualRMSNorm, as RowParallelLinear leaves them.

    Loads per-expert tensors (shard_id (expert, part)), stacked ones [E, out, in] (shard_id
    part, or None), and GGUF's stacked packed tensors (anything with `.expert(e)`), which stay
    packed per expert (`quant`) where the kernels multiply them.
    """

    def __init__(
        self,
        num_experts: int,
        input_size: int,
        output_sizes: list[int],
        column: bool,
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.ctx = ctx or ParallelContext()
        self.num_experts, self.column = num_experts, column
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        if column:
            self.rows = [self.ctx.shard(s, "moe_intermediate_size") for s in output_sizes]
            cols = input_size
        else:
            self.rows, cols = (
                list(output_sizes),
                self.ctx.shard(input_size, "moe_intermediate_size"),
            )
        self.cols = cols  # input columns per rank
        self.weight = nn.Parameter(
            torch.empty(num_experts, sum(self.rows), cols), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        self.quant: PackedExperts | None = None

    def is_loaded(self, got: set) -> bool:
        """Every part of every expert arrived, stacked or one by one."""
        parts = range(len(self.rows))
        if None in got:
            return True
        return all(p in got or all((e, p) in got for e in range(self.num_experts)) for p in parts)

    def _narrow(self, t, part: int):
        """This rank's slice of one expert's [out, in] part (float or packed; None: a packed
        column split that falls inside a quantization group)."""
        if self.column:
            rows = self.rows[part]
            start = self.ctx.rank * rows
            return (
                t.narrow_rows(start, rows)
                if isinstance(t, QuantTensor)
                else t[start : start + rows]
            )
        start = self.ctx.rank * self.cols
        if isinstance(t, QuantTensor):
            return t.narrow_cols(start, self.cols)
        return t[:, start : start + self.cols]

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        name = type(self).__name__
        expert, part = shard_id if isinstance(shard_id, tuple) else (None, shard_id or 0)
        if part >= len(self.rows):
            raise ValueError(f"{name}: part {part} of {len(self.rows)}")
        if expert is not None:
            return self._load_one(param, expert, part, loaded)
        if len(loaded.shape) != 3 or loaded.shape[0] != self.num_experts:
            raise ValueError(f"{name}: expected [{self.num_experts}, out, in], got "
                             f"{tuple(loaded.shape)}")  # fmt: skip
        if isinstance(loaded, torch.Tensor):
            for e in range(self.num_experts):
                self._load_one(param, e, part, loaded[e])
            return None
        for e in range(self.num_experts):  # a stacked packed tensor: expert by expert
            self._load_one(param, e, part, loaded.expert(e))
        return None

    def _load_one(self, param: nn.Parameter, e: int, part: int, loaded) -> None:
        if not 0 <= e < self.num_experts:
            raise ValueError(f"{type(self).__name__}: expert {e} of {self.num_experts}")
        if isinstance(loaded, QuantTensor):
            piece = self._narrow(loaded, part)
            if piece is not None and keeps_packed(param):
                return self._stash(e, part, piece)
            # NOTE: a rank's columns that split quantization groups: float, as RowParallelLinear
            loaded = loaded.dequantize()
        piece = self._narrow(loaded, part)
        offset = sum(self.rows[:part])
        dst = param.data[e, offset : offset + self.rows[part]]
        if dst.shape != piece.shape:
            raise ValueError(f"{type(self).__name__}: expert {e} part {part} expected shape "
                             f"{tuple(dst.shape)}, got {tuple(piece.shape)}")  # fmt: skip
        dst.copy_(piece)
        return None

    def _stash(self, e: int, part: int, piece: QuantTensor) -> None:
        """Packed parts wait for their expert's others, merge, and once every expert has its
        weight the float parameter is dropped (never written, so its pages never became
        resident: the packed bytes are what the process holds)."""
        if tuple(piece.shape) != (self.rows[part], self.cols):
            want = f"{self.rows[part]}x{self.cols}"
            raise ValueError(
                f"{type(self).__name__}: expert {e} part {part} is {tuple(piece.shape)}, "
                f"expected {want}"
            )
        stash = self.__dict__.setdefault("_pending", {})
        parts = stash.setdefault(e, {})
        parts[part] = piece
        if len(parts) < len(self.rows):
            return
        ordered = [parts[p] for p in range(len(self.rows))]
        if len(ordered) == 1:
            merged = ordered[0]
        elif all(isinstance(p, BlockTensor) for p in ordered):
            merged = cat_blocks(ordered)
        else:
            merged = cat_rows(ordered)
        if isinstance(merged, BlockTensor):
            merged.pack()
        stash[e] = merged
        if len(stash) == self.num_experts and all(not isinstance(v, dict) for v in stash.values()):
            del self.__dict__["_pending"]
            self.quant = PackedExperts(stash[i] for i in range(self.num_experts))
            self.weight = None

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's product for its rows x [n, in] -> [n, out] (row-invariant)."""
        if self.quant is not None:
            return packed_linear(x, self.quant[e])
        return rowwise_linear(x, self.weight[e])


class FusedMoE(nn.Module):
    """Top-k softmax routing and the routed experts' SwiGLU: route once, group the rows by
    expert, run each active expert on its rows, then weight and sum each token's k outputs in
    rank order (never in the order the batch happened to bring)."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        norm_topk_prob: bool,
        ctx: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.gate_up_proj = ExpertLinear(
            num_experts, hidden_size, [intermediate_size] * 2, column=True, ctx=ctx
        )
        self.down_proj = ExpertLinear(
            num_experts, intermediate_size, [hidden_size], column=False, ctx=ctx
        )

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] logits -> (weights [T, k] float32, expert ids [T, k]), as transformers routes;
        equal probabilities rank the lower expert id first (torch.topk leaves their order to its
        algorithm; decode.c's moe_route ranks them so too)."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        weights, ids = weights[:, : self.top_k], ids[:, : self.top_k]  # [T, k] each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU on its rows x [n, hidden] -> [n, hidden]."""
        gate, up = self.gate_up_proj(e, x).chunk(2, dim=-1)  # [n, inter / tp] each
        return self.down_proj(e, F.silu(gate, inplace=True).mul_(up))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (partial sums under TP)."""
        t, k = x.shape[0], self.top_k
        weights, ids = self.route(router_logits)
        if t == 1:  # decode of one sequence: no grouping (the same products, the same bits)
            out_rows = torch.cat([self.expert(e, x) for e in ids[0].tolist()])  # [k, hidden]
        else:
            flat = ids.flatten()  # [T * k]: row i * k + j is token i's j-th choice
            order = torch.argsort(flat, stable=True)  # grouped by expert
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            out_rows = x.new_empty(t * k, x.shape[1])  # [T * k, hidden]
            for e, sel in enumerate(order.split(counts)):
                if len(sel):  # sel: the (token, choice) pairs expert e serves
                    out_rows[sel] = self.expert(e, x[sel // k])
        out_rows = out_rows.view(t, k, -1)  # [T, k, hidden]
        w = weights.to(x.dtype)
        out = out_rows[:, 0] * w[:, :1]
        for j in range(1, k):
            out += out_rows[:, j] * w[:, j : j + 1]
        return out
