"""DeepSeek-V3 / R1 calls: `<｜tool▁calls▁begin｜>`, then per call `<｜tool▁call▁begin｜>function
<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>`, then `<｜tool▁calls▁end｜>`; V3.1's
`<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` reads the same way."""

from __future__ import annotations

import json
import re
from typing import Any

from scheduler import StructuredOutputsParams
from server.constraints import closed, tag
from server.tool_parsers.base import Extracted, ToolParser, json_end, start_lines, text_before

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# V3 / R1: a type, the separator, the name, a fenced JSON block; V3.1: name, separator, JSON
_HEAD = re.compile(
    rf"\s*{CALL_BEGIN}(?:function{SEP}([^\n]+)\n```json\n|(?!function{SEP})([^<\n]+){SEP})\s*"
)


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    tags = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
    keep_special_tokens = True

    def extract(self, text: str, final: bool) -> Extracted:
        content, i = text_before(text, CALLS_BEGIN, final)
        calls: list[tuple[str, str]] = []
        while i >= 0 and (m := _HEAD.match(text, i)) is not None:
            end = json_end(text, m.end())
            args = text[m.end() : end] if end >= 0 else text[m.end() :]
            calls.append(((m.group(1) or m.group(2)).strip(), args))
            close = text.find(CALL_END, end) if end >= 0 else -1
            i = close + len(CALL_END) if close >= 0 else -1
        if not calls and final and i >= 0:
            return Extracted(content=text)
        return Extracted(content=content, calls=calls)

    def constraint(
        self, name: str | None, parallel: bool, auto: bool, tag_ids: dict[str, int | None]
    ) -> StructuredOutputsParams:
        functions = self.functions(name)
        more = ' ("\\n" call)*' if parallel and name is None else ""
        t = {text: tag(text, tag_ids.get(text)) for text in self.tags}
        lines = [
            "%llguidance {}",
            *start_lines(CALLS_BEGIN, tag_ids.get(CALLS_BEGIN), f"call{more} calls_end", auto),
            f"calls_end: {t[CALLS_END]}",
            f'call: {t[CALL_BEGIN]} "function" {t[SEP]} fn "\\n```" {t[CALL_END]}',
            "fn: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
        ]
        for i, f in enumerate(functions):
            params = closed(f.get("parameters") or {"type": "object", "properties": {}})
            params = {**params, "x-guidance": {"whitespace_flexible": False}}
            head = json.dumps(f"{f['name']}\n```json\n")
            lines.append(f"fn_{i}: {head} %json{json.dumps(params)}")
        return StructuredOutputsParams("grammar", "\n".join(lines), param="tools")

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        body = "\n".join(
            f"{CALL_BEGIN}function{SEP}{c['function']['name']}\n```json\n"
            f"{json.dumps(c['function']['arguments'])}\n```{CALL_END}"
            for c in calls
        )
        return f"{CALLS_BEGIN}{body}{CALLS_END}"
