"""SmolLM3: Llama-shaped; every fourth layer (config `no_rope_layers` 0) skips RoPE (NoPE)."""

from __future__ import annotations

from model.models.llama import LlamaForCausalLM


class SmolLM3ForCausalLM(LlamaForCausalLM):
    pass
