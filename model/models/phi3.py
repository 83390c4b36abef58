"""Phi-3 / Phi-4: Llama-shaped with partial rotary and LongRoPE (from the config); its checkpoint
fuses qkv_proj and gate_up_proj, which are split back into q/k/v and gate/up so that each rank
narrows its own heads and rows (a fused tensor's rows are not one rank's slice)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from model.layers.quant import QuantTensor
from model.models.llama import LlamaForCausalLM


def _rows(t: torch.Tensor | QuantTensor, start: int, length: int) -> torch.Tensor | QuantTensor:
    if isinstance(t, QuantTensor):
        return t.narrow_rows(start, length)
    return t.narrow(0, start, length)


class Phi3ForCausalLM(LlamaForCausalLM):
    def adapt_weights(
        self, stream: Iterable[tuple[str, torch.Tensor | QuantTensor]]
    ) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
        """qkv_proj -> q_proj, k_proj, v_proj and gate_up_proj -> gate_proj, up_proj."""
        cfg = self.config
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        inter = cfg.intermediate_size
        parts = {
            ".self_attn.qkv_proj.": (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)),
            ".mlp.gate_up_proj.": (("gate_proj", 0, inter), ("up_proj", inter, inter)),
        }
        for name, tensor in stream:
            for fused, pieces in parts.items():
                if fused in name:
                    if tensor.shape[0] != pieces[-1][1] + pieces[-1][2]:
                        raise ValueError(
                            f"{name}: expected {pieces[-1][1] + pieces[-1][2]} rows, "
                            f"got {tensor.shape[0]}"
                        )
                    prefix = fused.rsplit(".", 2)[0]  # ".self_attn" / ".mlp"
                    for part, start, length in pieces:
                        yield name.replace(fused, f"{prefix}.{part}."), _rows(tensor, start, length)
                    break
            else:
                yield name, tensor
