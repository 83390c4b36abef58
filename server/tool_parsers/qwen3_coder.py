"""Qwen3-Coder's XML-like calls: `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n
</parameter>\\n…</function>\\n</tool_call>`; values are raw text, typed by the tool's schema."""

from __future__ import annotations

import json
import re
from typing import Any

from scheduler import StructuredOutputsParams
from server.tool_calls import CALL_CLOSE, CALL_OPEN
from server.tool_parsers.base import Extracted, ToolParser, start_lines, text_before

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>")
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>")
_FUNCTION_END = re.compile(r"\s*</function>")
_NEXT_CALL = re.compile(r"\s*</tool_call>\s*<tool_call>")
PARAM_CLOSE = "</parameter>"


class Qwen3CoderToolParser(ToolParser):
    name = "qwen3_coder"
    tags = (CALL_OPEN, CALL_CLOSE)

    def extract(self, text: str, final: bool) -> Extracted:
        content, i = text_before(text, CALL_OPEN, final)
        calls: list[tuple[str, str]] = []
        while i >= 0 and (m := _FUNCTION.match(text, i)) is not None:
            name, i, done = m.group(1).strip(), m.end(), False
            pieces = []
            while True:
                if (p := _PARAMETER.match(text, i)) is not None:
                    end = text.find(PARAM_CLOSE, p.end())
                    if end < 0:
                        break
                    key = p.group(1).strip()
                    value = _typed(text[p.end() : end], self._schema(name, key))
                    pieces.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
                    i = end + len(PARAM_CLOSE)
                elif (f := _FUNCTION_END.match(text, i)) is not None:
                    i, done = f.end(), True
                    break
                else:
                    break
            args = "{" + ", ".join(pieces) + ("}" if done or final else "")
            calls.append((name, args))
            nxt = _NEXT_CALL.match(text, i) if done else None
            i = nxt.end() if nxt is not None else -1
        if not calls and final and i >= 0:
            return Extracted(content=text)
        return Extracted(content=content, calls=calls)

    def _schema(self, function: str, key: str) -> dict[str, Any] | None:
        for t in self.tools:
            if t["function"]["name"] == function:
                return ((t["function"].get("parameters") or {}).get("properties") or {}).get(key)
        return None

    def constraint(
        self, name: str | None, parallel: bool, auto: bool, tag_ids: dict[str, int | None]
    ) -> StructuredOutputsParams:
        more = " call*" if parallel and name is None else ""
        close = tag_ids.get(CALL_CLOSE)
        close_tag = json.dumps(CALL_CLOSE) if close is None else f'("{CALL_CLOSE}" | <[{close}]>)'
        lines = [
            "%llguidance {}",
            *start_lines(CALL_OPEN, tag_ids.get(CALL_OPEN), f"first{more}", auto),
            f"call: {json.dumps(CALL_OPEN)} first",
            'first: "\\n" function "\\n" close_tag "\\n"?',
            f"close_tag: {close_tag}",
        ]
        functions = self.functions(name)
        lines.append("function: " + " | ".join(f"fn_{i}" for i in range(len(functions))))
        for i, f in enumerate(functions):
            lines += _function_rules(f"fn_{i}", f)
        return StructuredOutputsParams("grammar", "\n".join(lines), param="tools")

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        out = []
        for c in calls:
            params = "".join(
                f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n{PARAM_CLOSE}\n"
                for k, v in (c["function"]["arguments"] or {}).items()
            )
            out.append(
                f"{CALL_OPEN}\n<function={c['function']['name']}>\n{params}</function>\n"
                f"{CALL_CLOSE}"
            )
        return "\n".join(out)


def _typed(raw: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's text as its schema's type: strings stay text, others parse as JSON."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    kind = (schema or {}).get("type", "string")
    if kind == "string" or schema is None:
        return value
    if kind == "boolean" and value in ("True", "False"):  # the template writes Python's bools
        return value == "True"
    try:
        return json.loads(value)
    except ValueError:
        return value


def _function_rules(rule: str, function: dict[str, Any]) -> list[str]:
    """A function's block: its parameters in schema order, the required ones not optional."""
    params = function.get("parameters") or {}
    props, required = params.get("properties") or {}, set(params.get("required") or [])
    parts, lines = [], []
    for j, (key, schema) in enumerate(props.items()):
        sym = f"{rule}_p{j}"
        head = json.dumps(f"<parameter={key}>\n")
        if (schema or {}).get("type", "string") == "string":
            lines.append(f'{sym}[lazy]: {head} /[^<]*/ "\\n{PARAM_CLOSE}\\n"')
        else:
            lines.append(f'{sym}: {head} %json{json.dumps(schema)} "\\n{PARAM_CLOSE}\\n"')
        parts.append(sym if key in required else f"{sym}?")
    name = json.dumps(f"<function={function['name']}>\n")
    return [f'{rule}: {name} {" ".join(parts)} "</function>"', *lines]
