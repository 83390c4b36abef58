"""RMSNorm, and ResidualRMSNorm: the one place partial sums are all-reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.parallel import ParallelContext, all_reduce


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: the exact op order of transformers."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class ResidualRMSNorm(RMSNorm):
    """all-reduce(x) -> x + residual -> RMSNorm; returns (normed, new residual).

    With residual=None the input is already complete (the embedding) and becomes the residual.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, ctx: ParallelContext | None = None):
        super().__init__(hidden_size, eps)
        self.ctx = ctx or ParallelContext()

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = all_reduce(x, self.ctx) + residual
        return super().forward(x), x
