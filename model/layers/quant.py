"""Packed quantized weights (4-bit / 8-bit groups with a scale and a min) and their products.

Every GGUF type the loader reads maps onto one of two packed layouts without re-rounding:
  bits 4, group 32: Q4_0 (no mins: w = d (q - 8)), Q4_1, Q4_K (super-block scales multiplied out);
  bits 8, group 32: Q8_0, Q5_0 (q - 16), Q5_1, Q5_K; bits 8, group 16: Q6_K (q - 32), Q3_K
  (q - 4 where the hmask bit is clear), Q2_K (d sc q - dmin m: mins).
`w = scale * q + min` reproduces gguf-py's dequantization bit for bit (q * scale is exact in
float32 for every source type), so `dequantize()` + F.linear is the oracle, and quant.c's kernels
compute the same products with the weights dequantized in registers. `--quantization int8|int4`
packs float checkpoints into the same layouts (round to nearest, group 32: Q8_0 / Q4_1 style).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.layers import kernels

GROUP = 32


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """How a packed weight stores its groups: the kernel's parameters."""

    bits: int  # 4 (two values a byte, GGML's nibble order) or 8 (int8)
    group: int  # weights sharing one scale (and min): 32, or 16 (Q6_K)
    scale_dtype: torch.dtype  # float16 (the file's own scales) or float32 (K-quant products)
    has_min: bool  # else w = scale * q, and for 4 bits w = scale * (q - 8) (Q4_0)

    def widen(self, other: QuantFormat) -> QuantFormat:
        """The narrowest format that holds both exactly (merging q/k/v or gate/up parts)."""
        f32 = torch.float32 in (self.scale_dtype, other.scale_dtype)
        return QuantFormat(
            max(self.bits, other.bits),
            min(self.group, other.group),
            torch.float32 if f32 else torch.float16,
            self.has_min or other.has_min,
        )


@dataclass(slots=True)
class QuantTensor:
    """A packed [out, in] weight: qweight [out, in * bits / 8] uint8; scales, mins [out, in / g]."""

    fmt: QuantFormat
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 8 // self.fmt.bits

    @property
    def nbytes(self) -> int:
        parts = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def narrow_rows(self, start: int, length: int) -> QuantTensor:
        """Output rows [start, start + length), copied so the full tensor can be freed."""
        if start == 0 and length == self.shape[0]:
            return self
        m = None if self.mins is None else self.mins.narrow(0, start, length).clone()
        return QuantTensor(
            self.fmt,
            self.qweight.narrow(0, start, length).clone(),
            self.scales.narrow(0, start, length).clone(),
            m,
        )

    def narrow_cols(self, start: int, length: int) -> QuantTensor | None:
        """Input columns [start, start + length); None unless both ends fall on group borders."""
        g = self.fmt.group
        if start % g or length % g:
            return None
        b = self.fmt.bits
        m = None if self.mins is None else self.mins[:, start // g : (start + length) // g]
        return QuantTensor(
            self.fmt,
            self.qweight[:, start * b // 8 : (start + length) * b // 8].contiguous(),
            self.scales[:, start // g : (start + length) // g].contiguous(),
            None if m is None else m.contiguous(),
        )

    def to_format(self, fmt: QuantFormat) -> QuantTensor:
        """The same values in a wider format (4 -> 8 bits, group 32 -> 16, fp16 -> fp32, +min)."""
        if fmt == self.fmt:
            return self
        q, scales, mins = self.qweight, self.scales, self.mins
        out = q.shape[0]
        offset = 8 if self.fmt.bits == 4 and not self.fmt.has_min else 0  # Q4_0's q - 8
        if fmt.bits == 8 and self.fmt.bits == 4:
            nib = q.view(out, -1, 16)  # [out, groups, 16]
            vals = torch.cat([nib & 15, nib >> 4], dim=-1)  # [out, groups, 32] in 0..15
            q = (vals.reshape(out, -1).to(torch.int16) - offset).to(torch.int8).view(torch.uint8)
            offset = 0
        scales = scales.to(fmt.scale_dtype)
        if fmt.has_min and mins is None:
            mins = -offset * scales if offset else torch.zeros_like(scales)  # -8 s: exact
        elif fmt.has_min:
            mins = mins.to(fmt.scale_dtype)
        if fmt.group != self.fmt.group:
            rep = self.fmt.group // fmt.group
            scales = scales.repeat_interleave(rep, dim=1)
            mins = None if mins is None else mins.repeat_interleave(rep, dim=1)
        return QuantTensor(fmt, q.contiguous(), scales.contiguous(), mins)

    def take_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` -> [len(ids), in] float32 (embedding lookups)."""
        m = None if self.mins is None else self.mins[ids]
        return QuantTensor(self.fmt, self.qweight[ids], self.scales[ids], m).dequantize()

    def dequantize(self) -> torch.Tensor:
        """The plain-torch reference: [out, in] float32, w = scale * q + min per group."""
        out, n_in = self.shape
        g = self.fmt.group
        if self.fmt.bits == 4:
            nib = self.qweight.view(out, -1, 16)
            q = torch.cat([nib & 15, nib >> 4], dim=-1).float()  # [out, groups, 32]
            if self.mins is None:
                q = q - 8  # Q4_0: w = d (q - 8)
        else:
            q = self.qweight.view(torch.int8).view(out, -1, g).float()  # [out, groups, g]
        w = q * self.scales.float().unsqueeze(-1)
        if self.mins is not None:
            w = w + self.mins.float().unsqueeze(-1)
        return w.reshape(out, n_in)


def cat_rows(parts: list[QuantTensor]) -> QuantTensor:
    """Stack parts along output rows in their common (widest) format."""
    fmt = parts[0].fmt
    for p in parts[1:]:
        fmt = fmt.widen(p.fmt)
    parts = [p.to_format(fmt) for p in parts]
    mins = torch.cat([p.mins for p in parts]) if fmt.has_min else None
    return QuantTensor(
        fmt, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), mins
    )


def pad_rows(t: QuantTensor, rows: int) -> QuantTensor:
    """Append zero rows (dequantize to 0.0) up to `rows`: vocab padding under TP."""
    extra = rows - t.shape[0]
    if extra <= 0:
        return t

    def z(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(extra, x.shape[1])])

    return QuantTensor(t.fmt, z(t.qweight), z(t.scales), None if t.mins is None else z(t.mins))


def permute_rows(t: QuantTensor, fn) -> QuantTensor:
    """Apply a row permutation written for float tensors (`fn(rows_tensor) -> rows_tensor`)."""
    idx = fn(torch.arange(t.shape[0]).unsqueeze(1)).squeeze(1)
    m = None if t.mins is None else t.mins[idx]
    return QuantTensor(t.fmt, t.qweight[idx], t.scales[idx], m)


# -- from GGUF blocks ----------------------------------------------------------------------------


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte packed 6-bit (scale, min) pairs -> two [n, 8] arrays (gguf-py's order)."""
    n = scales.shape[0]
    d, m, m_d = np.split(scales.reshape(n, 3, 4), 3, axis=-2)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8).astype(np.float32), mn.reshape(n, 8).astype(np.float32)


def _nibbles(vals: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 in natural order -> [n, 16] bytes: byte k = v[k] | v[k + 16] << 4."""
    return (vals[:, :16] | (vals[:, 16:] << 4)).astype(np.uint8)


def _high_bits(qh: np.ndarray, n_bits: int) -> np.ndarray:
    """Little-endian bit planes: [n, n_bits / 8] bytes -> [n, n_bits] values 0/1."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :n_bits]


def _k23_to_packed(kind: str, b: np.ndarray):
    """Q2_K / Q3_K blocks -> bits 8, group 16 (Q2_K with mins): _blocks_to_packed's low-bit part."""
    n = b.shape[0]
    # value k = 128 h + 32 j + l: bits 2 j of qs[32 h + l] (Q3_K: minus 4 unless bit 4 h + j
    # of hmask[l]); one scale (and Q2_K's min) per 16 values
    qs = b[:, 16:80] if kind == "Q2_K" else b[:, 32:96]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256).astype(np.int8)
    if kind == "Q2_K":
        d, dmin, sc = _f16(b[:, 80:82]), _f16(b[:, 82:84]), b[:, 0:16]
        scales = d * (sc & 15).astype(np.float32)  # [n, 16] exact products, as gguf-py's
        mins = -(dmin * (sc >> 4).astype(np.float32))
        return q, scales, mins, (8, 16, torch.float32)
    hbit = (b[:, 0:32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = q - 4 * (1 - hbit.reshape(n, 256).astype(np.int8))
    p = b[:, 96:108]
    lo = np.concatenate([p[:, :8] & 15, p[:, :8] >> 4], axis=1)  # [n, 16]
    hi = (p[:, 8:12].reshape(n, 1, 4) >> shifts.reshape(1, 4, 1)) & 3  # [n, 4 shifts, 4]
    sc = (lo | (hi.reshape(n, 16) << 4)).astype(np.float32) - 32
    return q, _f16(b[:, 108:110]) * sc, None, (8, 16, torch.float32)


def _blocks_to_packed(kind: str, b: np.ndarray):
    """[n_blocks, type_size] raw bytes -> (q [n, values], scales [n, groups], mins, fmt fields)."""
    n = b.shape[0]
    h = np.float16
    if kind == "Q4_0":
        return b[:, 2:18], b[:, 0:2].copy().view(h), None, (4, 32, torch.float16)
    if kind == "Q4_1":
        return (
            b[:, 4:20],
            b[:, 0:2].copy().view(h),
            b[:, 2:4].copy().view(h),
            (4, 32, torch.float16),
        )
    if kind == "Q8_0":
        return b[:, 2:34].view(np.int8), b[:, 0:2].copy().view(h), None, (8, 32, torch.float16)
    if kind in ("Q5_0", "Q5_1"):
        off = 2 if kind == "Q5_0" else 4
        qh = _high_bits(b[:, off : off + 4], 32)
        qs = b[:, off + 4 : off + 20]
        vals = np.concatenate([qs & 15, qs >> 4], axis=1) | (qh << 4)  # [n, 32] 0..31
        if kind == "Q5_0":
            return (
                (vals.astype(np.int16) - 16).astype(np.int8),
                b[:, 0:2].copy().view(h),
                None,
                (8, 32, torch.float16),
            )
        return (
            vals.astype(np.int8),
            b[:, 0:2].copy().view(h),
            b[:, 2:4].copy().view(h),
            (8, 32, torch.float16),
        )
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [n, 1]
        sc, mn = _k_scale_min(b[:, 4:16])
        scales, mins = d * sc, -(dmin * mn)  # [n, 8] exact products, as gguf-py forms them
        if kind == "Q4_K":
            qs = b[:, 16:144].reshape(n, 4, 1, 32)
            vals = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n * 8, 32)
            return _nibbles(vals).reshape(n, 128), scales, mins, (4, 32, torch.float32)
        qh = b[:, 16:48]  # [n, 32]: bit j of byte k is the high bit of element 32 j + k
        qs = b[:, 48:176].reshape(n, 4, 1, 32)
        lo = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)
        hi = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        return (
            (lo | (hi << 4)).reshape(n, 256).astype(np.int8),
            scales,
            mins,
            (8, 32, torch.float32),
        )
    if kind in ("Q2_K", "Q3_K"):
        return _k23_to_packed(kind, b)
    if kind == "Q6_K":
        ql = b[:, 0:128].reshape(n, 2, 1, 64)
        ql = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(n, 8, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
            1, 1, 4, 1
        )
        qh = (qh & 3).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).astype(np.int16) - 32).astype(np.int8).reshape(n, 256)
        scales = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
        return q, scales, None, (8, 16, torch.float32)
    raise ValueError(f"no packed layout for GGUF type {kind}")


PACKED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "Q6_K")


def from_gguf_blocks(kind: str, data: np.ndarray, rows: int, cols: int) -> QuantTensor:
    """One GGUF tensor's raw blocks ([rows, row_bytes] uint8, the file's order) -> QuantTensor."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    if cols % block:
        raise ValueError(f"GGUF {kind} tensor row of {cols} values is not whole {block}-blocks")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, type_size)
    q, scales, mins, (bits, group, sdt) = _blocks_to_packed(kind, raw)
    np_sdt = np.float16 if sdt == torch.float16 else np.float32

    def t(a: np.ndarray, dtype=None) -> torch.Tensor:
        """One copy out of the memory-mapped file (it must not outlive the mapping)."""
        return torch.from_numpy(np.array(a, dtype=dtype, copy=True, order="C"))

    qweight = t(q.view(np.uint8).reshape(rows, -1))
    sc = t(scales.reshape(rows, cols // group), np_sdt)
    mn = None if mins is None else t(mins.reshape(rows, cols // group), np_sdt)
    return QuantTensor(QuantFormat(bits, group, sdt, mn is not None), qweight, sc, mn)


# -- round to nearest for float checkpoints ------------------------------------------------------


def quantize_rtn(w: torch.Tensor, bits: int) -> QuantTensor:
    """[out, in] float -> packed, group 32: int8 symmetric (Q8_0), int4 with a min (Q4_1)."""
    out, n_in = w.shape
    if n_in % GROUP:
        raise ValueError(f"int{bits} needs rows of whole {GROUP}-groups, got {n_in} columns")
    g = w.detach().float().reshape(out, n_in // GROUP, GROUP)  # [out, groups, 32]
    if bits == 8:
        d = (g.abs().amax(-1) / 127).half()  # [out, groups]
        inv = torch.where(d == 0, 0.0, 1.0 / d.float())
        q = torch.round(g * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
        qweight = q.reshape(out, n_in).view(torch.uint8)
        return QuantTensor(QuantFormat(8, GROUP, torch.float16, False), qweight, d, None)
    if bits != 4:
        raise ValueError(f"quantization bits must be 4 or 8, got {bits}")
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()
    inv = torch.where(d == 0, 0.0, 1.0 / d.float())
    q = torch.round((g - m.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    qweight = (q[..., :16] | (q[..., 16:] << 4)).reshape(out, n_in // 2)
    return QuantTensor(QuantFormat(4, GROUP, torch.float16, True), qweight, d, m)


# -- products ------------------------------------------------------------------------------------


def _args(t: QuantTensor, row: int = 0) -> tuple:
    """quant.c's weight arguments, starting at output row `row` (rows are contiguous)."""

    def at(x: torch.Tensor) -> int:
        return x.data_ptr() + row * x.stride(0) * x.element_size()

    m = at(t.mins) if t.mins is not None else None
    f32 = int(t.fmt.scale_dtype == torch.float32)
    return (at(t.qweight), at(t.scales), m, t.fmt.bits, t.fmt.group, f32)


def _lib() -> ctypes.CDLL | None:
    return kernels.load()


def kernel_usable(x: torch.Tensor) -> bool:
    lib = _lib()
    return (
        lib is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and x.stride(-1) == 1
    )


def dequantize_fast(
    t: QuantTensor, out: torch.Tensor | None = None, start: int = 0, rows: int | None = None
) -> torch.Tensor:
    """dequantize() of output rows [start, start + rows) through quant.c (same values)."""
    rows = t.shape[0] - start if rows is None else rows
    n_in = t.shape[1]
    w = out if out is not None else torch.empty(rows, n_in)
    lib = _lib()
    if lib is None:
        w.copy_(t.dequantize()[start : start + rows])
        return w
    rc = lib.qdequant(*_args(t, start), w.data_ptr(), rows, n_in, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"qdequant: unsupported format {t.fmt} for {rows}x{n_in}")
    return w


def qlinear(
    x: torch.Tensor, t: QuantTensor, bias: torch.Tensor | None, kernel: bool = True
) -> torch.Tensor:
    """x [m, in] @ dequantize(t)^T + bias -> [m, out] float32, through qgemm at every m: each row's
    sums run in one order whatever the batch (a float GEMM's blocking follows m, so a token's
    logits would change with its neighbours). kernel=False: dequantize + F.linear, the oracle."""
    rows, n_in = t.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"qlinear: x has {x.shape[-1]} columns, weight is {rows}x{n_in}")
    if not kernel or not kernel_usable(x):
        return F.linear(x, t.dequantize().to(x.dtype), bias)
    m = x.shape[0]
    if m == 0:  # a prefill chunk that samples no row still projects through the lm_head
        return torch.empty(0, rows)
    y = torch.empty(m, rows)  # [m, out]
    b = None if bias is None else bias.contiguous().data_ptr()
    rc = _lib().qgemm(
        x.data_ptr(), x.stride(0), *_args(t), b, y.data_ptr(), rows, m, n_in, rows,
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"qgemm: unsupported format {t.fmt} for {m}x{n_in} @ {rows}x{n_in}")
    return y
