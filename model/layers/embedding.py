"""Vocabulary-parallel token embedding and LM head (the head runs only on sampling rows)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.linear import dense, drop_packed, install_packed, keeps_packed
from model.layers.qdot import BlockTensor, pad_block_rows
from model.layers.quant import QuantTensor, pad_rows
from model.parallel import ParallelContext, all_reduce, gather_to_first


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks (vocab padded to a multiple of the TP size)."""

    def __init__(
        self, vocab_size: int, hidden_size: int, ctx: ParallelContext | None = None
    ) -> None:
        super().__init__()
        self.ctx = ctx or ParallelContext()
        self.vocab_size = vocab_size
        padded = -(-vocab_size // self.ctx.size) * self.ctx.size
        self.vocab_per_rank = padded // self.ctx.size
        self.vocab_start = self.ctx.rank * self.vocab_per_rank
        weight = torch.empty(self.vocab_per_rank, hidden_size)  # [vocab / tp, hidden]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.quant: QuantTensor | None = None  # packed rows (a quantized GGUF / --quantization)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | QuantTensor, shard_id=None
    ) -> None:
        drop_packed(self)
        shape = tuple(loaded.shape)
        if shape[0] != self.vocab_size or shape[1:] != tuple(param.shape[1:]):
            raise ValueError(
                f"{type(self).__name__}: expected shape ({self.vocab_size}, {param.shape[1]}), "
                f"got {shape}"
            )
        rows = max(0, min(self.vocab_per_rank, self.vocab_size - self.vocab_start))
        if isinstance(loaded, QuantTensor):
            part = loaded.narrow_rows(self.vocab_start, rows)
            pad = pad_block_rows if isinstance(part, BlockTensor) else pad_rows
            part = pad(part, self.vocab_per_rank)
            if keeps_packed(param):
                return install_packed(self, part, type(self).__name__)
            param.data.copy_(part.dequantize())
            return
        param.data[rows:].zero_()
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.take_rows(ids)  # [num_tokens, hidden], dequantized rows
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return self._lookup(input_ids)  # [num_tokens, hidden]
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        h = self._lookup(local.masked_fill(outside, 0))
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(h, self.ctx)  # [num_tokens, hidden]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits on rank 0 (gathered from every rank's slice); other ranks get
        an empty [num_rows, 0] tensor: only rank 0 samples."""
        logits = dense(self, hidden, self.weight, None)  # [num_rows, vocab_per_rank]
        logits = gather_to_first(logits, self.ctx)  # rank 0: [num_rows, padded vocab]
        return logits[:, : self.vocab_size] if logits.shape[1] > self.vocab_size else logits


class ParallelLMHead(VocabParallelEmbedding):
    """Untied LM head: same sharding as the embedding, forward = logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.project(hidden)  # [num_rows, vocab]
