"""Tool calling: the tool preamble, the grammar that enforces calls, and parsing calls from text.

The model writes each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the
Hermes / Qwen format that many chat templates teach). For `tool_choice` "required" or a named
function a Lark grammar (llguidance's, with `%json` for each function's parameter schema) allows
nothing else, so even a small model returns well-formed calls; "auto" leaves the choice to the
model and parses whatever calls it wrote.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from scheduler import StructuredOutputsParams
from scheduler.errors import SamplingParamsError

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

# The built-in system preamble, used when the chat template does not take `tools` itself.
PREAMBLE = (
    "You can call functions. The available functions, as JSON schemas:\n{tools}\n"
    "To call a function, reply with one line per call, exactly in this form:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>'
)


def preamble(tools: list[dict[str, Any]]) -> str:
    """The system text that describes the tools to a model whose template knows none."""
    return PREAMBLE.format(tools="\n".join(json.dumps(t["function"]) for t in tools))


def _closed(schema: Any) -> Any:
    """Objects with `properties` and no `additionalProperties` get `false`: the arguments still
    validate against the tool's schema, and a small model cannot invent keys for ever."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    params = _closed(function.get("parameters") or {"type": "object", "properties": {}})
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        # compact JSON: with free whitespace small models can emit newlines for ever
        "x-guidance": {"whitespace_flexible": False},
    }


def tool_call_constraint(
    tools: list[dict[str, Any]], name: str | None, parallel: bool
) -> StructuredOutputsParams:
    """A grammar that allows only calls: to `name`, or to any tool; several only if `parallel`."""
    functions = [t["function"] for t in tools]
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            known = ", ".join(repr(t["function"]["name"]) for t in tools)
            raise SamplingParamsError(
                f"tool_choice names function {name!r}, which is not in tools ({known})",
                "tool_choice",
            )
        parallel = False
    rules = [
        f"call_{i}: {json.dumps(CALL_OPEN)} %json{json.dumps(_call_schema(f))} "
        f"{json.dumps(CALL_CLOSE)}"
        for i, f in enumerate(functions)
    ]
    alts = " | ".join(f"call_{i}" for i in range(len(functions)))
    # NOTE: no separator between parallel calls: after a newline small models start another call
    start = "start: call+" if parallel else "start: call"
    grammar = "\n".join([start, f"call: {alts}", *rules])
    return StructuredOutputsParams("grammar", grammar, param="tools")


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _parse_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], text)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split model output into content (text outside calls, None if empty) and its calls."""
    streamer = ToolCallStreamer()
    content, calls = streamer.feed(text)
    rest, more = streamer.flush()
    content += rest
    return (content.strip() or None) if calls or more else content, calls + more


class ToolCallStreamer:
    """Incremental parser: text deltas in, (content to show, completed calls) out.

    Text that could be the start of `<tool_call>` is held back until it is known not to be.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        content, calls = "", []
        while True:
            if self._in_call:
                end = self._buf.find(CALL_CLOSE)
                if end < 0:
                    return content, calls
                call = _parse_call(self._buf[:end])
                if call is not None:
                    calls.append(call)
                    self.num_calls += 1
                else:  # not a call after all: show it as text
                    content += CALL_OPEN + self._buf[: end + len(CALL_CLOSE)]
                self._buf = self._buf[end + len(CALL_CLOSE) :].lstrip("\n")
                self._in_call = False
                continue
            start = self._buf.find(CALL_OPEN)
            if start >= 0:
                content += self._buf[:start]
                self._buf = self._buf[start + len(CALL_OPEN) :]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buf, CALL_OPEN)
            content += self._buf[: len(self._buf) - keep]
            self._buf = self._buf[len(self._buf) - keep :]
            return content, calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """At the end: an unterminated call is parsed if it is complete JSON, else shown as text."""
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            call = _parse_call(rest)
            if call is not None:
                self.num_calls += 1
                return "", [call]
            return CALL_OPEN + rest, []
        return rest, []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
