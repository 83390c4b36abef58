"""Mixture-of-experts families over the Llama layers: Qwen3-MoE, Mixtral, Qwen2-MoE (shared expert
with its own sigmoid gate); OLMoE's attention is in olmoe.py. A layer is sparse or dense as the
config says (Qwen's decoder_sparse_step and mlp_only_layers: ModelConfig.moe_layers).

decode.c serves Qwen3-MoE, Mixtral and Qwen2-MoE steps at TP 1 with packed experts (its MoE block:
FusedDecode.build); the torch modules are the reference and serve the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from model.config import ModelConfig
from model.layers.experts import FusedMoE, ReplicatedLinear
from model.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from model.parallel import ParallelContext


class SparseMoeBlock(nn.Module):
    """Router -> routed experts (+ a sigmoid-gated shared expert); partial sums under TP."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"routed experts run SwiGLU; hidden_act is {cfg.hidden_act!r}")
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts)
        self.experts = FusedMoE(
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.norm_topk_prob,
            ctx,
        )
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = LlamaMLP(cfg, ctx, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.experts(h, self.gate(h))  # [T, hidden]
        if self.shared_expert is not None:
            # NOTE: every rank scales its partial sums by the same replicated gate
            out += torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out


class MoeDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def make_mlp(cfg: ModelConfig, ctx: ParallelContext, layer: int) -> nn.Module:
        return SparseMoeBlock(cfg, ctx) if cfg.is_moe_layer(layer) else LlamaMLP(cfg, ctx)


class MoeModel(LlamaModel):
    decoder_layer = MoeDecoderLayer


# transformers 5's in-memory layout, if a checkpoint was saved that way: [E, 2 * inter, hidden]
FUSED_GATE_UP = ".mlp.experts.gate_up_proj"


class MoeForCausalLM(LlamaForCausalLM):
    """Llama-shaped attention, routed experts in the sparse layers."""

    model_class = MoeModel
    # expert tensor name -> (our stacked parameter, part): load_weights' per-expert mapping
    expert_params_mapping = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
        "down_proj": ("down_proj", 0),
    }

    def adapt_weights(
        self, stream: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Stacked [E, 2 * inter, hidden] gate_up tensors split into their gate and up halves."""
        for name, tensor in stream:
            if name.endswith((FUSED_GATE_UP, ".mlp.experts.down_proj")):
                if name.endswith(FUSED_GATE_UP):
                    base = name.removesuffix(".gate_up_proj")
                    gate, up = tensor.chunk(2, dim=1)
                    yield f"{base}.gate_proj.weight", gate
                    yield f"{base}.up_proj.weight", up
                else:
                    yield f"{name}.weight", tensor
                continue
            yield name, tensor


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3 attention (per-head q/k norms); top-k renormalized where norm_topk_prob says."""


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2 attention (q/k/v bias); a shared expert beside the routed ones."""


# Mixtral's checkpoint names -> the ones above
MIXTRAL_NAMES = (
    (".block_sparse_moe.", ".mlp."),
    (".w1.", ".gate_proj."),
    (".w3.", ".up_proj."),
    (".w2.", ".down_proj."),
)


class MixtralForCausalLM(MoeForCausalLM):
    """Mistral attention; every layer routes, and the top-k weights always sum to 1."""

    def adapt_weights(
        self, stream: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        def renamed():
            for name, tensor in stream:
                if ".block_sparse_moe." in name:
                    for old, new in MIXTRAL_NAMES:
                        name = name.replace(old, new)
                yield name, tensor

        return super().adapt_weights(renamed())
