"""Tool calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes / Qwen, which
many templates teach): the preamble and their parser (server/constraints.py's grammar enforces
them)."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

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


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of call `index` as OpenAI streams it: id and name first, then arguments (JSON
    text); parse_tool_calls returns whole calls in the same shape."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


def _parse_call(body: str) -> tuple[str, str] | None:
    """A whole call's name and arguments (JSON text), whatever the key order."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return obj["name"], text


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCallDelta]]:
    """Content (text outside calls; None if empty beside calls) and calls: the stream's parser."""
    streamer = ToolCallStreamer()
    return gather(streamer.feed(text) + streamer.flush())


def gather(events: list[str | ToolCallDelta]) -> tuple[str | None, list[ToolCallDelta]]:
    """A streamer's events as a whole reply: content (None if blank beside calls), whole calls."""
    content, calls = "", []
    for ev in events:
        if isinstance(ev, str):
            content += ev
        elif ev.id is not None:
            calls.append(ev)
        else:
            calls[ev.index].arguments += ev.arguments
    return ((content.strip() or None) if calls else content), calls


# the head of a call as the grammar writes it: the name first, then the arguments' value
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')


class ToolCallStreamer:
    """Text deltas in; content and ToolCallDeltas out (id and name once complete, then arguments
    as they come; other shapes whole at the end). A possible `<tool_call>` start is held back."""

    def __init__(self) -> None:
        self._buf = ""
        self._state = "text"  # text | head | args | tail (after the arguments, before the close)
        self._pending = ""  # whitespace-only content, sent with the next text (dropped at a call)
        self._depth = 0  # the arguments' JSON nesting
        self._in_str = self._esc = False
        self.num_calls = 0

    def feed(self, delta: str) -> list[str | ToolCallDelta]:
        self._buf += delta
        out: list[str | ToolCallDelta] = []
        while self._step(out):
            pass
        return out

    def flush(self) -> list[str | ToolCallDelta]:
        """An unterminated call: parsed if complete JSON, else text; cut arguments stay as sent."""
        out: list[str | ToolCallDelta] = []
        rest, self._buf = self._buf, ""
        if self._state == "head":
            call = _parse_call(rest)
            if call is not None:
                self._emit_call(out, *call)
            else:
                self._content(out, CALL_OPEN + rest)
        elif self._state == "text":
            self._content(out, rest)
        if self._pending and not self.num_calls:
            out.append(self._pending)
        self._pending, self._state = "", "text"
        return out

    def _content(self, out: list, text: str) -> None:
        text, self._pending = self._pending + text, ""
        if text.strip():
            out.append(text)
        else:
            self._pending = text

    def _emit_call(self, out: list, name: str, arguments: str) -> None:
        out.append(ToolCallDelta(self.num_calls, "", new_call_id(), name))
        if arguments:
            out.append(ToolCallDelta(self.num_calls, arguments))
        self.num_calls += 1

    def _step(self, out: list) -> bool:
        """Consume what the current state can; True if the state changed (loop again)."""
        buf = self._buf
        if self._state == "text":
            start = buf.find(CALL_OPEN)
            if start < 0:
                keep = partial_suffix(buf, CALL_OPEN)
                self._content(out, buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                return False
            self._content(out, buf[:start])
            self._pending = ""  # whitespace before a call is no content
            self._buf, self._state = buf[start + len(CALL_OPEN) :], "head"
            return True
        if self._state == "head":
            m = _HEAD.match(buf)
            value = buf[m.end() :].lstrip() if m else ""
            if m and value[:1] in ("{", "["):
                name = json.loads(f'"{m.group(1)}"')
                out.append(ToolCallDelta(self.num_calls, "", new_call_id(), name))
                self._buf, self._state = value, "args"
                self._depth, self._in_str, self._esc = 0, False, False
                return True
            end = buf.find(CALL_CLOSE)
            if end < 0:
                return False
            call = _parse_call(buf[:end])  # another shape: the whole call at once
            if call is not None:
                self._emit_call(out, *call)
            else:
                self._content(out, CALL_OPEN + buf[: end + len(CALL_CLOSE)])
            self._buf, self._state = buf[end + len(CALL_CLOSE) :], "text"
            return True
        if self._state == "args":
            n = self._scan(buf)
            if n:
                out.append(ToolCallDelta(self.num_calls, buf[:n]))
            self._buf = buf[n:]
            if self._depth > 0:
                return False
            self.num_calls += 1
            self._state = "tail"
            return True
        end = buf.find(CALL_CLOSE)  # tail: the closing brace and tag
        if end < 0:
            self._buf = buf[-len(CALL_CLOSE) :]
            return False
        self._buf, self._state = buf[end + len(CALL_CLOSE) :], "text"
        return True

    def _scan(self, text: str) -> int:
        """How many chars of `text` still belong to the arguments' JSON value."""
        for i, ch in enumerate(text):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(text)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    return next((n for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), 0)
