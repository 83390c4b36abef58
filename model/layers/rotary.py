"""Rotary position embeddings (neox-style halves, as Hugging Face Llama), with the scalings the
supported families use: linear, dynamic, yarn, longrope and llama3."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _base_exponents(dim: int) -> torch.Tensor:
    return torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim  # [dim // 2]


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """transformers' _compute_yarn_parameters, step for step."""
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or s["max_position_embeddings"] / orig
    attention = s.get("attention_factor")
    if attention is None:
        mscale, all_dim = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and all_dim:
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim)
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    pos_freqs = theta ** _base_exponents(dim)
    extra = 1 - ramp  # extrapolation share of each frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv_freq, float(attention)


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, computed exactly as transformers does."""
    return rope_frequencies(head_dim, theta, scaling)[0]


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """([rotary_dim // 2] float32 inverse frequencies, cos/sin factor), as transformers computes
    them. `dynamic` is the identity here: max_model_len never exceeds max_position_embeddings,
    below which transformers keeps the unscaled frequencies too."""
    inv_freq = 1.0 / (theta ** _base_exponents(head_dim))
    kind = None if scaling is None else scaling["rope_type"]
    if kind in (None, "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling)
    if kind == "longrope":
        short = torch.tensor(scaling["short_factor"], dtype=torch.float32, device="cpu")
        return 1.0 / (short * theta ** _base_exponents(head_dim)), longrope_attention(scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def longrope_attention(s: dict[str, Any]) -> float:
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or s["max_position_embeddings"] / orig
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


class RotaryEmbedding(nn.Module):
    """cos/sin are computed once per forward from the positions and shared by all layers.

    rotary_dim < head_dim (Phi-3's partial rotary): only the first rotary_dim of each head turn.
    longrope: positions at or past original_max_position_embeddings take the long factors (per
    token; transformers switches per forward, on its longest position: the same on one stream).
    """

    def __init__(
        self,
        rotary_dim: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq, self.attention_scaling = rope_frequencies(rotary_dim, theta, scaling)
        # NOTE: plain tuples, not buffers: survive meta-device construction and .to_empty().
        self.inv_freq = tuple(inv_freq.tolist())
        self.long_inv_freq: tuple[float, ...] | None = None
        self.long_from = 0
        if scaling is not None and scaling["rope_type"] == "longrope":
            long = torch.tensor(scaling["long_factor"], dtype=torch.float32, device="cpu")
            long_inv = 1.0 / (long * theta ** _base_exponents(rotary_dim))
            self.long_inv_freq = tuple(long_inv.tolist())
            self.long_from = int(scaling["original_max_position_embeddings"])
        self._inv_freq_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        tables = self._inv_freq_on.get(device)
        if tables is None:  # NOTE: once per device: a CUDA graph capture may not copy from host
            short = torch.tensor(self.inv_freq, dtype=torch.float32, device=device)
            long = None
            if self.long_inv_freq is not None:
                long = torch.tensor(self.long_inv_freq, dtype=torch.float32, device=device)
            tables = self._inv_freq_on[device] = (short, long)
        return tables

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin of shape [num_tokens, 1, rotary_dim] for broadcasting over heads.

        Both halves repeat the same angles; sin's first half is negated, so that rotating is
        x * cos + swap_halves(x) * sin (three kernels per layer instead of seven).
        """
        inv_freq, long = self._tables(positions.device)
        if long is not None:  # [num_tokens, rotary_dim // 2]
            inv_freq = torch.where(positions[:, None] >= self.long_from, long, inv_freq)
        freqs = positions.float()[:, None] * inv_freq  # [num_tokens, rotary_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1)
        return cos, sin

    @staticmethod
    def apply_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first cos.shape[-1] columns of x in place (x may be a strided view, e.g. the
        q/k columns of the qkv output); the rest (partial rotary) pass through."""
        rot = cos.shape[-1]
        xr = x[..., :rot] if rot != x.shape[-1] else x
        half = rot // 2
        swapped = torch.cat((xr[..., half:], xr[..., :half]), dim=-1)  # [x2, x1]
        xr.mul_(cos).addcmul_(swapped, sin)  # [x1 cos - x2 sin, x2 cos + x1 sin]
        return x
