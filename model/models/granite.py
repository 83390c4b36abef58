"""Granite: Llama-shaped with four multipliers from its config: embedding (after the lookup),
residual (each branch before it joins), attention (the softmax scale) and logits (a divisor)."""

from __future__ import annotations

from model.models.llama import LlamaForCausalLM


class GraniteForCausalLM(LlamaForCausalLM):
    pass
