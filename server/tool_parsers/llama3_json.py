"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the whole reply is `{"name": …, "parameters": {…}}`
(after an optional `<|python_tag|>`), several joined by `; `, as their template asks."""

from __future__ import annotations

import json
import re
from typing import Any

from scheduler import StructuredOutputsParams
from server.constraints import call_schema
from server.tool_parsers.base import Extracted, ToolParser, json_call

PYTHON_TAG = "<|python_tag|>"
_SEP = re.compile(r"\s*;\s*")


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    tags = (PYTHON_TAG,)
    keep_special_tokens = True  # <|python_tag|> is a special token

    def extract(self, text: str, final: bool) -> Extracted:
        rest = text.lstrip()
        i = len(text) - len(rest)
        if rest.startswith(PYTHON_TAG):
            i = len(text) - len(rest[len(PYTHON_TAG) :].lstrip())
        elif rest and PYTHON_TAG.startswith(rest) and not final:
            return Extracted()
        if i >= len(text) or text[i] != "{":
            return Extracted(content=text if final or i < len(text) else "")
        calls = []
        while True:
            call, end = json_call(text, i, final)
            if call is None:
                break
            calls.append(call)
            sep = _SEP.match(text, end) if end >= 0 else None
            if sep is None or not text.startswith("{", sep.end()):
                break
            i = sep.end()
        if not calls:  # a JSON reply, no call: content, once it is whole
            return Extracted(content=text if final else "")
        return Extracted(calls=calls)

    def constraint(
        self, name: str | None, parallel: bool, auto: bool, tag_ids: dict[str, int | None]
    ) -> StructuredOutputsParams | None:
        if auto:
            return None  # no tag to wait for: a reply is a call only if it is one
        schemas = [call_schema(f, "parameters") for f in self.functions(name)]
        more = ' ("; " call)*' if parallel and name is None else ""
        lines = [
            "%llguidance {}",
            f"start: call{more}",
            "call: " + " | ".join(f"fn_{i}" for i in range(len(schemas))),
            *(f"fn_{i}: %json{json.dumps(s)}" for i, s in enumerate(schemas)),
        ]
        return StructuredOutputsParams("grammar", "\n".join(lines), param="tools")

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        return "; ".join(
            json.dumps({"name": c["function"]["name"], "parameters": c["function"]["arguments"]})
            for c in calls
        )
