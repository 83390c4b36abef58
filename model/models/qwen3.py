"""Qwen3: Llama-shaped with per-head RMSNorm on q and k before RoPE, an explicit head_dim and
no qkv bias (all from its config: ModelConfig.qk_norm, head_dim, attention_bias)."""

from __future__ import annotations

from model.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
