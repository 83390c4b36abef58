"""LlamaForCausalLM: Llama, Mistral and Qwen2 (flags: q/k/v bias, tied head, sliding window), and
the shared pieces the Llama-shaped families reuse (Qwen3, SmolLM3, Granite, Phi-3). TP-ready."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers.attention import Attention, AttentionMetadata
from model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model.layers.fused_decode import ACTS
from model.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from model.layers.norm import ResidualRMSNorm, RMSNorm
from model.layers.rotary import RotaryEmbedding
from model.parallel import ParallelContext

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def attention_scale(cfg: ModelConfig) -> float:
    """Granite's attention_multiplier, Gemma's query_pre_attn_scalar ** -0.5, else 1/sqrt(D)."""
    if cfg.attention_multiplier is not None:
        return float(cfg.attention_multiplier)
    if cfg.query_pre_attn_scalar is not None:
        return float(cfg.query_pre_attn_scalar) ** -0.5
    return cfg.head_dim**-0.5


class LlamaAttention(nn.Module):
    """Fused qkv GEMM -> (q/k norm) -> RoPE -> paged attention -> o_proj partial sums."""

    norm_offset = 0.0  # Gemma's q/k norms scale by (1 + w)

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, layer: int) -> None:
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
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, self.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, self.norm_offset)
        self.is_sliding = cfg.is_sliding(layer)
        self.uses_rope = cfg.uses_rope(layer)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            backend,
            scale=attention_scale(cfg),
            sliding_window=cfg.sliding_window if self.is_sliding else None,
            logits_soft_cap=cfg.attn_logit_softcapping,
        )

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        t, nh, nkv, d = h.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(h)  # [T, (H + 2 * kv_heads) * D]
        v = qkv[:, (nh + nkv) * d :].view(t, nkv, d)  # [T, kv_heads, D]
        if self.q_norm is None:
            # NOTE: rotated in place: q and k stay views of the qkv output (no copies)
            qk = qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d)
            if self.uses_rope:
                RotaryEmbedding.apply_(qk, cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
        else:
            q = self.q_norm(qkv[:, : nh * d].view(t, nh, d))  # [T, H, D]
            k = self.k_norm(qkv[:, nh * d : (nh + nkv) * d].view(t, nkv, d))  # [T, kv_heads, D]
            if self.uses_rope:
                RotaryEmbedding.apply_(q, cos, sin)
                RotaryEmbedding.apply_(k, cos, sin)
        o = self.attn(q, k, v, meta)  # [T, H * D]
        return self.o_proj(o)  # [T, hidden] partial sums under TP


class LlamaMLP(nn.Module):
    """Gated MLP (SwiGLU; GELU-tanh for Gemma) with one gate_up GEMM; down_proj leaves partial
    sums for the next norm."""

    def __init__(
        self, cfg: ModelConfig, ctx: ParallelContext, intermediate_size: int | None = None
    ) -> None:
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {cfg.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}"
            )
        inter = intermediate_size or cfg.intermediate_size
        self.silu = cfg.hidden_act == "silu"
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], ctx=ctx)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, reduce=False, ctx=ctx)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)  # [T, inter / tp] each
        if self.silu:
            # in place on the gate half: down_proj reads a strided view, GEMM-compatible, no copy
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))
        return self.down_proj(self.act(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    """`attention` and `make_mlp` are the knobs (OLMoE's attention, the MoE families' experts)."""

    attention: type[nn.Module] = LlamaAttention

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str, layer: int) -> None:
        super().__init__()
        m = cfg.residual_multiplier
        self.input_layernorm = ResidualRMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, ctx, residual_multiplier=m
        )
        self.self_attn = self.attention(cfg, ctx, backend, layer)
        self.post_attention_layernorm = ResidualRMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, ctx, residual_multiplier=m
        )
        self.mlp = self.make_mlp(cfg, ctx, layer)

    @staticmethod
    def make_mlp(cfg: ModelConfig, ctx: ParallelContext, layer: int) -> nn.Module:
        return LlamaMLP(cfg, ctx)

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
    """embed -> layers -> final norm; `decoder_layer`, `embed` and `final_norm` are the knobs."""

    decoder_layer: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, backend: str) -> None:
        super().__init__()
        self.hidden_size, self.embedding_multiplier = cfg.hidden_size, cfg.embedding_multiplier
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ctx)
        scaling = cfg.rope_scaling_dict
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, scaling)
        self.rotary_emb_local = None  # Gemma 3's sliding layers: their own base, no scaling
        if cfg.rope_local_theta is not None:
            self.rotary_emb_local = RotaryEmbedding(cfg.rotary_dim, cfg.rope_local_theta)
        self.layers = nn.ModuleList(
            self.decoder_layer(cfg, ctx, backend, i) for i in range(cfg.num_hidden_layers)
        )
        self.norm = self.final_norm(cfg, ctx)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        return h * self.embedding_multiplier if self.embedding_multiplier != 1.0 else h  # Granite

    @staticmethod
    def final_norm(cfg: ModelConfig, ctx: ParallelContext) -> nn.Module:
        return ResidualRMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, ctx, residual_multiplier=cfg.residual_multiplier
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.embed(input_ids)  # [T, hidden]
        rope = self.rotary_emb.cos_sin(positions, h.dtype)  # cos, sin: [T, 1, rotary_dim] each
        local = rope
        if self.rotary_emb_local is not None:
            local = self.rotary_emb_local.cos_sin(positions, h.dtype)
        residual = None
        for layer in self.layers:
            cos, sin = local if layer.self_attn.is_sliding else rope
            h, residual = layer(h, residual, cos, sin, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Hidden states for every scheduled token; logits only for the rows that sample."""

    model_class: type[nn.Module] = LlamaModel
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
        self.model = self.model_class(cfg, ctx, attn_backend)
        self.lm_head = None  # tied: the embedding projects
        if not cfg.tie_word_embeddings:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ctx)

    @property
    def fits_fused_decode(self) -> bool:
        """decode.c's layer: Llama's or Gemma's (sandwich norms, (1 + w) weights, GELU-tanh,
        attention soft-cap), per-head q/k norms, sliding windows, NoPE layers, partial rotary,
        Granite's multipliers and any rope scaling (it takes the torch cos/sin); OLMoE
        overrides it (FusedDecode.build checks MoE layers' experts)."""
        return self.config.hidden_act in ACTS and isinstance(self.model, LlamaModel)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final-normed hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] (sampling rows only) -> [num_rows, vocab] float32."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits = head.project(hidden).float()
        cfg = self.config
        if cfg.logits_scaling != 1.0:  # Granite
            logits = logits / cfg.logits_scaling
        if cfg.final_logit_softcapping is not None:  # Gemma 2
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
