"""OLMoE: routed experts (model/models/moe.py) under an attention whose q and k RMSNorms span
every head at once (not per head, as Qwen3's do), with optional clip_qkv.

NOTE: a norm over every head needs every head's values. Under tensor parallelism each rank
projects q, k and v whole (the qkv weights replicated, not split) and keeps its own heads after
the norms: the one all-reduce before each RMSNorm stays the only collective.
"""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.layers.attention import Attention, AttentionMetadata
from model.layers.linear import RowParallelLinear
from model.layers.norm import RMSNorm
from model.layers.rotary import RotaryEmbedding
from model.models.llama import LlamaAttention, attention_scale
from model.models.moe import MoeDecoderLayer, MoeForCausalLM, MoeModel
from model.parallel import ParallelContext


class OlmoeAttention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, layer: int) -> None:
        super().__init__(cfg, ParallelContext(), backend, layer)  # qkv_proj: every head
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_norm = RMSNorm(nh * d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(nkv * d, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        # this rank's heads: [first, first + count) of q's and of k's / v's
        self.q_heads = (ctx.rank * ctx.shard(nh, "num_attention_heads"), nh // ctx.size)
        if nkv >= ctx.size:
            n = ctx.shard(nkv, "num_key_value_heads")
            self.kv_heads = (ctx.rank * n, n)
        else:  # fewer KV heads than ranks: each rank keeps the one its q heads read
            self.kv_heads = (ctx.rank // (ctx.size // nkv), 1)
        self.o_proj = RowParallelLinear(nh * d, cfg.hidden_size, reduce=False, ctx=ctx)
        self.attn = Attention(
            self.q_heads[1], self.kv_heads[1], d, backend, scale=attention_scale(cfg)
        )

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t, nh, nkv, d = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(h)  # [T, (H + 2 * kv_heads) * D], every head
        q = self.q_norm(qkv[:, : nh * d])  # [T, H * D], normed over every head
        k = self.k_norm(qkv[:, nh * d : (nh + nkv) * d])  # [T, kv_heads * D]
        v = qkv[:, (nh + nkv) * d :]
        if self.clip_qkv is not None:  # after the norms, as transformers clips
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        (q0, qn), (k0, kn) = self.q_heads, self.kv_heads
        q = q[:, q0 * d : (q0 + qn) * d].reshape(t, qn, d)  # this rank's heads
        k = k[:, k0 * d : (k0 + kn) * d].reshape(t, kn, d)
        v = v[:, k0 * d : (k0 + kn) * d].reshape(t, kn, d)
        RotaryEmbedding.apply_(q, cos, sin)
        RotaryEmbedding.apply_(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))  # [T, hidden] partial sums under TP


class OlmoeDecoderLayer(MoeDecoderLayer):
    attention = OlmoeAttention


class OlmoeModel(MoeModel):
    decoder_layer = OlmoeDecoderLayer


class OlmoeForCausalLM(MoeForCausalLM):
    model_class = OlmoeModel

    @property
    def fits_fused_decode(self) -> bool:
        return False  # decode.c's q/k norms are per head; OLMoE's span every head
