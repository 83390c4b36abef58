"""One file per model family over the shared layers; MODELS maps a config's architecture to it."""

from __future__ import annotations

from torch import nn

from model.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from model.models.granite import GraniteForCausalLM
from model.models.llama import LlamaForCausalLM
from model.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from model.models.olmoe import OlmoeForCausalLM
from model.models.phi3 import Phi3ForCausalLM
from model.models.qwen3 import Qwen3ForCausalLM
from model.models.smollm3 import SmolLM3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "SmolLM3ForCausalLM": SmolLM3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "OlmoeForCausalLM": OlmoeForCausalLM,
}
