"""Reasoning parsers by vLLM's `--reasoning-parser` names: split `<think>` text off replies."""

from __future__ import annotations

from server.reasoning.base import ReasoningDelta, ReasoningParser, ReasoningStreamer
from server.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from server.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}

__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "ReasoningStreamer"]
