"""GGUF weights kept in the file's own blocks, multiplied with int8-quantized activations (qdot.c).

The int8 activation path (`--activation-dtype int8`, the default for a GGUF on a CPU with the
kernels): resident weight bytes are the file's tensor bytes, K-quants (Q2_K..Q6_K) included, and a
merged projection (qkv, gate_up) keeps each part's type. Each activation row is quantized once per
layer input, per 32 values (Q4_0..Q8_0) or per 256 (K-quants), with its own scale, so a row's
numbers never depend on the other rows of the batch. The reference below (`reference_linear`:
gguf-py's dequantization of the weights times the dequantized int8 activations, in float64) is
what the kernel is tested against; the float32 path (model/layers/quant.py) stays the oracle
against transformers.
"""

from __future__ import annotations

import numpy as np
import torch

from model.layers import kernels
from model.layers.quant import QuantFormat, QuantTensor

# GGML type ids qdot.c takes, and the activation blocks each needs (0: 32 values, 1: 256)
GGML_TYPE_IDS = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14,
}  # fmt: skip
ACT_BLOCK = {k: 256 if k.endswith("_K") else 32 for k in GGML_TYPE_IDS}


def _block(kind: str) -> tuple[int, int]:
    """(values, bytes) of one block of a GGML type."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]


class BlockTensor(QuantTensor):
    """An [out, in] weight as GGUF blocks: parts stacked by output rows, each (kind, [rows,
    row_bytes] uint8) in its own type; a merged projection is several parts."""

    __slots__ = ("parts", "cols", "panels")

    def __init__(self, parts: list[tuple[str, torch.Tensor]], cols: int) -> None:
        for kind, data in parts:
            values, size = _block(kind)
            if kind not in GGML_TYPE_IDS or cols % values or data.shape[1] != cols // values * size:
                raise ValueError(
                    f"{kind} part of {tuple(data.shape)} bytes does not hold rows of {cols} values"
                )
        self.parts, self.cols = parts, cols
        self.panels: list[torch.Tensor | None] | None = None  # qdot.c's 16-row panels, per part

    def pack(self, drop_file_blocks: bool = True) -> BlockTensor:
        """Repack the parts the kernels multiply in panels (same bytes); the file's blocks are
        dropped unless rows are still looked up (a tied embedding keeps both)."""
        lib = kernels.load()
        if self.panels is not None or lib is None:
            return self
        panels: list[torch.Tensor | None] = []
        for i, (kind, data) in enumerate(self.parts):
            tid = GGML_TYPE_IDS[kind]
            if not lib.px_supported(tid):
                panels.append(None)
                continue
            rows = data.shape[0]
            out = torch.empty(lib.px_bytes(tid, rows, self.cols), dtype=torch.uint8)
            rc = lib.px_pack(
                tid, data.data_ptr(), data.shape[1], rows, self.cols, out.data_ptr(),
                torch.get_num_threads(),
            )  # fmt: skip
            if rc != 0:
                raise ValueError(f"px_pack: {kind} {rows}x{self.cols} cannot be packed")
            panels.append(out)
            if drop_file_blocks:  # NOTE: an empty [rows, 0] keeps the row count, not the bytes
                self.parts[i] = (kind, torch.empty(rows, 0, dtype=torch.uint8))
        self.panels = panels
        return self

    @property
    def fmt(self) -> QuantFormat:  # type: ignore[override]
        raise AttributeError("a BlockTensor has no QuantFormat: it keeps the file's blocks")

    @property
    def shape(self) -> tuple[int, int]:
        return sum(d.shape[0] for _, d in self.parts), self.cols

    @property
    def nbytes(self) -> int:
        panels = sum(p.numel() for p in self.panels or () if p is not None)
        return sum(d.numel() for _, d in self.parts) + panels

    @property
    def act_blocks(self) -> set[int]:
        return {ACT_BLOCK[k] for k, _ in self.parts}

    def _slices(self, start: int, length: int):
        """(kind, data rows) of output rows [start, start + length), part by part."""
        at = 0
        for kind, data in self.parts:
            lo, hi = max(start, at), min(start + length, at + data.shape[0])
            if lo < hi:
                yield kind, data[lo - at : hi - at]
            at += data.shape[0]

    def narrow_rows(self, start: int, length: int) -> BlockTensor:
        if start == 0 and length == self.shape[0]:
            return self
        return BlockTensor([(k, d.clone()) for k, d in self._slices(start, length)], self.cols)

    def narrow_cols(self, start: int, length: int) -> BlockTensor | None:
        """Input columns [start, start + length); None unless both ends fall on block borders."""
        parts = []
        for kind, data in self.parts:
            values, size = _block(kind)
            if start % values or length % values:
                return None
            lo, hi = start // values * size, (start + length) // values * size
            parts.append((kind, data[:, lo:hi].contiguous()))
        return BlockTensor(parts, length)

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` -> [len(ids), in] float32 (embedding lookups)."""
        if len(self.parts) != 1:
            return self.dequantize()[ids]
        kind, data = self.parts[0]
        panel = self.panels[0] if self.panels else None
        if panel is None:
            return _dequantize(kind, data[ids])
        ids = ids.to(torch.long).contiguous()
        out = torch.empty(ids.numel(), self.cols)
        lib = kernels.load()
        rc = lib.px_rows(
            GGML_TYPE_IDS[kind], panel.data_ptr(), data.shape[0], self.cols, ids.data_ptr(),
            ids.numel(), out.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"token ids out of range 0..{data.shape[0] - 1}: {ids.tolist()[:8]}")
        return out

    def dequantize(self) -> torch.Tensor:
        """gguf-py's dequantization of every part: [out, in] float32."""
        return torch.cat([_dequantize(k, d) for k, d in self.parts])


def _dequantize(kind: str, data: torch.Tensor) -> torch.Tensor:
    import gguf

    if data.shape[1] == 0 and data.shape[0]:
        raise ValueError(f"this {kind} weight keeps only its panels: no file blocks to read")
    arr = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[kind])
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


def rtn_to_blocks(t: QuantTensor) -> BlockTensor:
    """quantize_rtn's formats as GGUF blocks, bytes as they are: int8 is Q8_0 (d, 32 int8), int4
    is Q4_1 (d, m, 16 bytes of GGML's nibble order)."""
    rows, cols = t.shape
    groups = cols // 32
    half = [t.scales.view(torch.uint8).reshape(rows, groups, 2)]
    if t.fmt.bits == 8:
        kind, parts = "Q8_0", [*half, t.qweight.reshape(rows, groups, 32)]
    else:
        m = t.mins.view(torch.uint8).reshape(rows, groups, 2)
        kind, parts = "Q4_1", [*half, m, t.qweight.reshape(rows, groups, 16)]
    return BlockTensor([(kind, torch.cat(parts, dim=2).reshape(rows, -1))], cols)


def cat_blocks(parts: list[BlockTensor]) -> BlockTensor:
    """Stack along output rows; neighbouring parts of one type share one kernel call."""
    merged: list[tuple[str, torch.Tensor]] = []
    for t in parts:
        for kind, data in t.parts:
            if merged and merged[-1][0] == kind:
                merged[-1] = (kind, torch.cat([merged[-1][1], data]))
            else:
                merged.append((kind, data))
    return BlockTensor(merged, parts[0].cols)


def pad_block_rows(t: BlockTensor, rows: int) -> BlockTensor:
    """Append zero rows (all-zero blocks dequantize to 0.0) up to `rows`: vocab padding."""
    extra = rows - t.shape[0]
    if extra <= 0:
        return t
    kind, data = t.parts[-1]
    return BlockTensor(
        [*t.parts[:-1], (kind, torch.cat([data, data.new_zeros(extra, data.shape[1])]))], t.cols
    )


def permute_block_rows(t: BlockTensor, fn) -> BlockTensor:
    """quant.permute_rows for GGUF blocks: a row permutation written for float tensors
    (`fn(rows_tensor) -> rows_tensor`, llama's Q/K un-permutation) moves whole rows of blocks."""
    ((kind, data),) = t.parts
    idx = fn(torch.arange(data.shape[0]).unsqueeze(1)).squeeze(1)
    return BlockTensor([(kind, data[idx].contiguous())], t.cols)


# -- the reference -------------------------------------------------------------------------------


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, n] -> (d [m, n / block], q [m, n] int8): qdot.c's activation blocks, in torch."""
    m, n = x.shape
    g = x.float().reshape(m, n // block, block)
    amax = g.abs().amax(-1)  # [m, blocks]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(g * inv.unsqueeze(-1)).to(torch.int8)
    return amax / 127.0, q.reshape(m, n)


def reference_linear(x: torch.Tensor, t: BlockTensor, bias: torch.Tensor | None = None):
    """What qx_linear computes, in float64: dequantized weights times dequantized activations."""
    m, n = x.shape
    outs = []
    for kind, data in t.parts:
        d, q = quantize_activations(x, ACT_BLOCK[kind])
        xd = (q.double().reshape(m, -1, ACT_BLOCK[kind]) * d.double().unsqueeze(-1)).reshape(m, n)
        outs.append(xd @ _dequantize(kind, data).double().T)
    y = torch.cat(outs, dim=1)
    return y if bias is None else y + bias.double()


# -- the product ---------------------------------------------------------------------------------


def usable(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] > 0
    ) and kernels.load() is not None


def qx_linear(x: torch.Tensor, t: BlockTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [m, in] @ W^T + bias -> [m, out] float32: x quantized once, each part its kernel."""
    rows, n_in = t.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"qx_linear: x has {x.shape[-1]} columns, weight is {rows}x{n_in}")
    m = x.shape[0]
    if m == 0:
        return torch.empty(0, rows)
    if not usable(x):
        return torch.nn.functional.linear(x, t.dequantize().to(x.dtype), bias)
    lib = kernels.load()
    threads = torch.get_num_threads()
    x = x.contiguous()
    acts = {}
    for block in t.act_blocks:
        k = int(block == 256)
        buf = torch.empty(m * lib.qx_row_bytes(n_in, k), dtype=torch.uint8)
        if lib.qx_quantize(x.data_ptr(), n_in, m, n_in, k, buf.data_ptr(), threads):
            raise ValueError(f"qx_quantize: {m}x{n_in} is not whole {block}-blocks")
        acts[block] = buf
    y = torch.empty(m, rows)  # [m, out]
    bias = None if bias is None else bias.contiguous()
    at = 0
    panels = t.panels or [None] * len(t.parts)
    for (kind, data), panel in zip(t.parts, panels, strict=True):
        n, tid, xq = data.shape[0], GGML_TYPE_IDS[kind], acts[ACT_BLOCK[kind]].data_ptr()
        b = None if bias is None else bias.data_ptr() + 4 * at
        if panel is not None:
            rc = lib.px_gemm(
                tid, panel.data_ptr(), n, n_in, xq, m, y.data_ptr() + 4 * at, rows, b, threads
            )
        else:
            rc = lib.qx_gemm(
                tid, data.data_ptr(), data.shape[1], n, n_in, xq, m, y.data_ptr() + 4 * at, rows,
                b, threads,
            )  # fmt: skip
        if rc != 0:
            raise ValueError(f"qx_gemm: {kind} {n}x{n_in} with {m} rows is not supported")
        at += n
    return y
