"""The CPU decode GEMV (gemv.c, built by kernels.py): float32 rows against float32 weights.

Decode on CPU is bound by reading the weights; gemv.c streams them at close to memory
bandwidth (~30 GB/s on the 2-core test machine vs ~20 GB/s for oneDNN's GEMV: single-stream
SmolLM2 decode 35.5 -> 21.3 ms a token, measured in one run). Without the kernel library every
caller falls back to oneDNN / F.linear, which stay the oracle.
"""

from __future__ import annotations

import torch

from model.layers import kernels


def max_rows() -> int:
    """The largest batch the kernel takes; 0 while unavailable."""
    lib = kernels.load()
    return 0 if lib is None else lib.gemv_max_rows()


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether gemv() takes this product: CPU float32, a few unit-stride rows, [out, in] weight."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= max_rows()
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.stride(-1) == 1
        and weight.is_contiguous()
        and not x.requires_grad
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [m, in] @ weight[out, in]^T + bias -> [m, out]; call only when usable() said so."""
    m, n_in = x.shape
    n_out = weight.shape[0]
    if weight.shape[1] != n_in:
        raise ValueError(f"gemv: x has {n_in} columns, weight {tuple(weight.shape)}")
    lib = kernels.load()
    if lib is None:
        raise RuntimeError("gemv: the kernel library is not available")
    y = torch.empty(m, n_out, dtype=torch.float32)  # [m, out]
    b = None if bias is None else bias.data_ptr()
    rc = lib.gemv(
        x.data_ptr(),
        x.stride(0),
        weight.data_ptr(),
        b,
        y.data_ptr(),
        n_out,
        m,
        n_in,
        n_out,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"gemv: unsupported sizes m={m}, in={n_in}, out={n_out}")
    return y
