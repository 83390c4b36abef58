"""LlamaForCausalLM for Llama, Mistral and Qwen2 (flags: q/k/v bias, tied head), TP-ready."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers.attention import Attention, AttentionMetadata
from model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from model.layers.norm import ResidualRMSNorm
from model.layers.rotary import RotaryEmbedding
from model.parallel import ParallelContext


class LlamaAttention(nn.Module):
    """Fused qkv GEMM -> RoPE on q and k together -> paged attention -> o_proj partial sums."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.attention_bias,
            ctx=ctx,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, reduce=False, ctx=ctx
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, backend)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t, nh, nkv, d = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(h)  # [T, (H + 2 * kv_heads) * D]
        # NOTE: rotated in place: q and k stay views of the qkv output (no copies)
        qk = RotaryEmbedding.apply_(qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d), cos, sin)
        v = qkv[:, (nh + nkv) * d :].view(t, nkv, d)  # [T, kv_heads, D]
        o = self.attn(qk[:, :nh], qk[:, nh:], v, meta)  # [T, H * D]
        return self.o_proj(o)  # [T, hidden] partial sums under TP


class LlamaMLP(nn.Module):
    """SwiGLU with one gate_up GEMM; down_proj leaves partial sums for the next norm."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], ctx=ctx)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, reduce=False, ctx=ctx)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)  # [T, inter / tp] each
        # in place on the gate half: down_proj reads a strided view, GEMM-compatible, no copy
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str) -> None:
        super().__init__()
        self.input_layernorm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.self_attn = LlamaAttention(cfg, ctx, backend)
        self.post_attention_layernorm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)
        self.mlp = LlamaMLP(cfg, ctx)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, ctx, backend) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb.cos_sin(positions, h.dtype)  # [T, 1, D] each
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Hidden states for every scheduled token; logits only for the rows that sample."""

    # checkpoint name -> (our packed parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, cfg: ModelConfig, ctx: ParallelContext | None = None, attn_backend: str = "sdpa"
    ) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        self.config = cfg
        self.model = LlamaModel(cfg, ctx, attn_backend)
        self.lm_head = None  # tied: the embedding projects
        if not cfg.tie_word_embeddings:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] (sampling rows only) -> [num_rows, vocab] float32."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        return head.project(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
