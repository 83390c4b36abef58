"""OLMoE: routed experts (model/models/moe.py) under an attention whose q and k RMSNorms span
every head at once (not per head, as Qwen3's do), with optional clip_qkv.

NOTE: a norm over every head needs every head's values: under tensor parallelism that would be a
second collective per layer, so OLMoE is served with tensor_parallel_size 1 (rendezvous refuses).
"""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.layers.attention import AttentionMetadata
from model.layers.norm import RMSNorm
from model.layers.rotary import RotaryEmbedding
from model.models.llama import LlamaAttention
from model.models.moe import MoeDecoderLayer, MoeForCausalLM, MoeModel
from model.parallel import ParallelContext


class OlmoeAttention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, layer: int) -> None:
        if ctx.size > 1:
            raise ValueError(
                f"OLMoE's q/k norms span all {cfg.num_attention_heads} heads: tensor_parallel_size "
                f"{ctx.size} would split them; serve it with tensor_parallel_size 1"
            )
        super().__init__(cfg, ctx, backend, layer)
        self.q_norm = RMSNorm(self.num_heads * self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t, nh, nkv, d = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(h)  # [T, (H + 2 * kv_heads) * D]
        q = self.q_norm(qkv[:, : nh * d])  # [T, H * D], normed over every head
        k = self.k_norm(qkv[:, nh * d : (nh + nkv) * d])  # [T, kv_heads * D]
        v = qkv[:, (nh + nkv) * d :]
        if self.clip_qkv is not None:  # after the norms, as transformers clips
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = q.view(t, nh, d), k.view(t, nkv, d), v.reshape(t, nkv, d)
        RotaryEmbedding.apply_(q, cos, sin)
        RotaryEmbedding.apply_(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))


class OlmoeDecoderLayer(MoeDecoderLayer):
    attention = OlmoeAttention


class OlmoeModel(MoeModel):
    decoder_layer = OlmoeDecoderLayer


class OlmoeForCausalLM(MoeForCausalLM):
    model_class = OlmoeModel
