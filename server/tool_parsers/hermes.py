"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`, the
format tokenmill's own preamble teaches, so this parser is server/tool_calls.py's."""

from __future__ import annotations

import json
from typing import Any

from scheduler import StructuredOutputsParams
from server.constraints import tool_call_constraint
from server.tool_calls import CALL_CLOSE, CALL_OPEN, ToolCallStreamer
from server.tool_parsers.base import ToolParser


class HermesToolParser(ToolParser):
    name = "hermes"
    tags = (CALL_OPEN, CALL_CLOSE)

    def streamer(self) -> ToolCallStreamer:  # type: ignore[override]
        return ToolCallStreamer()

    def constraint(
        self, name: str | None, parallel: bool, auto: bool, tag_ids: dict[str, int | None]
    ) -> StructuredOutputsParams:
        ids = (tag_ids.get(CALL_OPEN), tag_ids.get(CALL_CLOSE))
        return tool_call_constraint(self.tools, name, parallel, auto=auto, tag_ids=ids)

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        return "\n".join(f"{CALL_OPEN}\n{json.dumps(_body(c))}\n{CALL_CLOSE}" for c in calls)


def _body(call: dict[str, Any]) -> dict[str, Any]:
    return {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
