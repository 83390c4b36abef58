"""Rotary position embeddings (neox-style halves, as Hugging Face Llama), incl. llama3 scaling."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, computed exactly as transformers does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    kind, factor = scaling["rope_type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin are computed once per forward from the positions and shared by all layers."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        # NOTE: a plain tuple, not a buffer: survives meta-device construction and .to_empty().
        self.inv_freq = tuple(inv_frequencies(head_dim, theta, scaling).tolist())
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin of shape [num_tokens, 1, head_dim] for broadcasting over heads.

        Both halves repeat the same angles; sin's first half is negated, so that rotating is
        x * cos + swap_halves(x) * sin (three kernels per layer instead of seven).
        """
        inv_freq = self._inv_freq_on.get(positions.device)
        if inv_freq is None:  # NOTE: once per device: a CUDA graph capture may not copy from host
            inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32, device=positions.device)
            self._inv_freq_on[positions.device] = inv_freq
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [num_tokens, head_dim // 2]
        cos, sin = freqs.cos(), freqs.sin()
        cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1)
        sin = torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1)
        return cos, sin

    @staticmethod
    def apply_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x in place (x may be a strided view, e.g. the q/k columns of the qkv output)."""
        half = x.shape[-1] // 2
        swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x2, x1]
        return x.mul_(cos).addcmul_(swapped, sin)  # [x1 cos - x2 sin, x2 cos + x1 sin]
