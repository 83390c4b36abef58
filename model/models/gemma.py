"""Gemma 2 and Gemma 3 (text): sqrt(hidden)-scaled embedding, (1 + w) norms before and after
attention and the MLP, GELU-tanh MLP; the rest (q/k norm, soft-caps, windows, local RoPE base,
query_pre_attn_scalar) comes from the config through the shared Llama attention."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from model.config import ModelConfig
from model.layers.attention import AttentionMetadata
from model.layers.norm import PostRMSNorm, ResidualRMSNorm
from model.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel
from model.parallel import ParallelContext

# Gemma3ForConditionalGeneration: tensors of the image path, and the text model's prefixes (as
# the hub's checkpoints save them, and as transformers names them in memory)
MULTIMODAL_ONLY = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)


class GemmaAttention(LlamaAttention):
    norm_offset = 1.0


class GemmaDecoderLayer(nn.Module):
    """Sandwich norms. NOTE: under TP the post-norms all-reduce (PostRMSNorm) before they norm,
    so the residual norms that follow them must not reduce again (reduce=False)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, layer: int) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = ResidualRMSNorm(hidden, eps, ctx, offset=1.0, reduce=False)
        self.self_attn = GemmaAttention(cfg, ctx, backend, layer)
        self.post_attention_layernorm = PostRMSNorm(hidden, eps, ctx)
        self.pre_feedforward_layernorm = ResidualRMSNorm(hidden, eps, ctx, offset=1.0, reduce=False)
        self.mlp = LlamaMLP(cfg, ctx)
        self.post_feedforward_layernorm = PostRMSNorm(hidden, eps, ctx)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(h, residual)
        h = self.post_attention_layernorm(self.self_attn(h, cos, sin, meta))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class GemmaModel(LlamaModel):
    decoder_layer = GemmaDecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        # NOTE: sqrt(hidden) rounded to the activations' dtype first, as transformers does
        return h * torch.tensor(self.hidden_size**0.5, dtype=h.dtype)

    @staticmethod
    def final_norm(cfg: ModelConfig, ctx: ParallelContext) -> nn.Module:
        return ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx, offset=1.0, reduce=False)


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_class = GemmaModel


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3 text: q/k norms (SUPPORTED_ARCHITECTURES' default) and a local RoPE base on the
    sliding layers (ModelConfig.rope_local_theta); no soft-caps in its configs."""

    def adapt_weights(
        self, stream: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """A Gemma3ForConditionalGeneration checkpoint (4B and up): its language model only."""
        for name, tensor in stream:
            if name.startswith(MULTIMODAL_ONLY):
                continue
            for prefix, ours in TEXT_PREFIXES:
                if name.startswith(prefix):
                    name = ours + name[len(prefix) :]
                    break
            yield name, tensor
