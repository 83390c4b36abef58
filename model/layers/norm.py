"""RMSNorm, and ResidualRMSNorm / PostRMSNorm: the places partial sums are all-reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.parallel import ParallelContext, all_reduce


class RMSNorm(nn.Module):
    """x / rms(x) * weight in float32 like Hugging Face's LlamaRMSNorm; offset 1 is Gemma's
    x / rms(x) * (1 + weight) (its checkpoints store weight - 1)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: the exact op order of transformers."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class ResidualRMSNorm(RMSNorm):
    """all-reduce(x) * residual_multiplier -> + residual -> RMSNorm; returns (normed, residual).

    With residual=None the input is already complete (the embedding) and becomes the residual.
    reduce=False: x is already complete (Gemma's post-norms reduced it before norming).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        ctx: ParallelContext | None = None,
        *,
        offset: float = 0.0,
        reduce: bool = True,
        residual_multiplier: float = 1.0,
    ) -> None:
        super().__init__(hidden_size, eps, offset)
        self.ctx = ctx or ParallelContext()
        self.reduce, self.residual_multiplier = reduce, residual_multiplier

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            if self.reduce:
                x = all_reduce(x, self.ctx)
            if self.residual_multiplier != 1.0:
                x = x * self.residual_multiplier
            x = x + residual
        return super().forward(x), x


class PostRMSNorm(RMSNorm):
    """all-reduce(x) -> RMSNorm: Gemma's norms after attention and the MLP, which must see the
    complete sum (a norm of partial sums is not the partial of the norm)."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, ctx: ParallelContext | None = None, offset=1.0
    ) -> None:
        super().__init__(hidden_size, eps, offset)
        self.ctx = ctx or ParallelContext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(all_reduce(x, self.ctx))
