"""Reasoning parsers by vLLM's `--reasoning-parser` names: split `<think>` text off replies."""

from __future__ import annotations

from server.reasoning.base import ReasoningDelta, ReasoningParser, ReasoningStreamer
from server.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from server.reasoning.mistral import MistralReasoningParser
from server.reasoning.qwen3 import Qwen3ReasoningParser

# NOTE: GLM-4.5 and DeepSeek-V3.1 write Qwen3's way: `<think>` opened by the model, or by the
# template (V3.1 thinking), or closed by it (thinking off): the prompt's tail tells which
REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "deepseek_v3": Qwen3ReasoningParser,
    "glm45": Qwen3ReasoningParser,
    "mistral": MistralReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "ReasoningStreamer"]
