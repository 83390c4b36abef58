"""Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]` (v3 tokenizers: 7B v0.3, Nemo,
Small 3), or `[TOOL_CALLS]name[ARGS]{…}` per call (v11+: Small 3.2, Magistral, Devstral)."""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from scheduler import StructuredOutputsParams
from server.constraints import call_schema
from server.tool_parsers.base import (
    Extracted,
    ToolParser,
    json_call,
    json_end,
    start_lines,
    text_before,
)

TOOL_CALLS = "[TOOL_CALLS]"
# v11+: a name, an optional [CALL_ID]id, then [ARGS]
_NAMED = re.compile(r"\s*([A-Za-z0-9_.-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]")
_COMMA = re.compile(r"\s*,")
_ID_CHARS = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"
    tags = (TOOL_CALLS,)
    keep_special_tokens = True  # [TOOL_CALLS] is a special token

    def new_id(self) -> str:
        """9 letters and digits: Mistral's template refuses any other call id."""
        return "".join(secrets.choice(_ID_CHARS) for _ in range(9))

    def extract(self, text: str, final: bool) -> Extracted:
        content, at = text_before(text, TOOL_CALLS, final)
        if at < 0:
            return Extracted(content=content)
        rest = text[at:].lstrip()
        i = len(text) - len(rest)
        calls: list[tuple[str, str]] = []
        if rest.startswith("["):
            i += 1
            while True:
                call, end = json_call(text, i, final)
                if call is None:
                    break
                calls.append(call)
                comma = _COMMA.match(text, end) if end >= 0 else None
                if comma is None:
                    break
                i = comma.end()
        else:
            while (m := _NAMED.match(text, i)) is not None:
                end = json_end(text, m.end())
                calls.append((m.group(1), text[m.end() : end if end >= 0 else len(text)]))
                nxt = text[end:].lstrip() if end >= 0 else ""
                if not nxt.startswith(TOOL_CALLS):
                    break
                i = len(text) - len(nxt) + len(TOOL_CALLS)
        if not calls and final:
            return Extracted(content=text)
        return Extracted(content=content, calls=calls)

    def constraint(
        self, name: str | None, parallel: bool, auto: bool, tag_ids: dict[str, int | None]
    ) -> StructuredOutputsParams:
        schemas = [call_schema(f) for f in self.functions(name)]
        array: dict[str, Any] = {"type": "array", "items": {"anyOf": schemas}, "minItems": 1}
        if not parallel or name is not None:
            array["maxItems"] = 1
        array["x-guidance"] = {"whitespace_flexible": False}
        lines = [
            "%llguidance {}",
            *start_lines(TOOL_CALLS, tag_ids.get(TOOL_CALLS), "calls", auto),
            f"calls: %json{json.dumps(array)}",
        ]
        return StructuredOutputsParams("grammar", "\n".join(lines), param="tools")

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        body = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls
        ]
        return TOOL_CALLS + json.dumps(body)
