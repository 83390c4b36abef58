"""Tool-call parsers by vLLM's `--tool-call-parser` names: each family's own call format."""

from __future__ import annotations

from server.tool_parsers.base import Extracted, ExtractStreamer, ToolParser
from server.tool_parsers.deepseek_v3 import DeepSeekV3ToolParser
from server.tool_parsers.hermes import HermesToolParser
from server.tool_parsers.llama3_json import Llama3JsonToolParser
from server.tool_parsers.mistral import MistralToolParser
from server.tool_parsers.qwen3_coder import Qwen3CoderToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "deepseek_v3": DeepSeekV3ToolParser,  # V3, R1 and V3.1's formats alike
    "deepseek_v31": DeepSeekV3ToolParser,
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "qwen3_coder": Qwen3CoderToolParser,
}

__all__ = ["TOOL_PARSERS", "ExtractStreamer", "Extracted", "ToolParser"]
