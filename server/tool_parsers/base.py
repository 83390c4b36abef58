"""A tool-call parser: one model family's call format → OpenAI tool calls, whole or streamed, and
the grammar that makes `tool_choice` required or named write that format."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from scheduler import StructuredOutputsParams
from server.constraints import functions, tag
from server.tool_calls import ToolCallDelta, gather, new_call_id, partial_suffix


@dataclass(slots=True)
class Extracted:
    """What a text so far holds: content sure to be content, and calls (name once whole, the
    arguments' JSON text so far). Both only grow as the text grows: the streamer sends the
    difference."""

    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)


class ToolParser:
    """Base: `extract` does the parsing; a family also names its tags (their special token ids
    reach `constraint`), whether they are special tokens the detokenizer must keep, and how
    earlier calls are written back into a prompt whose template knows no `tool_calls`."""

    name = ""
    tags: tuple[str, ...] = ()  # tag texts the grammar may take as single special tokens
    keep_special_tokens = False  # the tags are special tokens: skip_special_tokens off

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []

    def extract(self, text: str, final: bool) -> Extracted:
        raise NotImplementedError

    def streamer(self) -> ExtractStreamer:
        return ExtractStreamer(self)

    def parse(self, text: str) -> tuple[str | None, list[ToolCallDelta]]:
        """Content (None if empty beside calls) and whole calls: the stream's parser."""
        s = self.streamer()
        return gather(s.feed(text) + s.flush())

    def constraint(
        self, name: str | None, parallel: bool, auto: bool, tag_ids: dict[str, int | None]
    ) -> StructuredOutputsParams | None:
        """The grammar for calls in this format (None: the family has none for this mode)."""
        return None

    def format_calls(self, calls: list[dict[str, Any]]) -> str:
        """Earlier calls (OpenAI's shape, arguments as objects) as the model writes them."""
        raise NotImplementedError

    def new_id(self) -> str:
        """A fresh call id (a family whose template checks ids makes its own)."""
        return new_call_id()

    def functions(self, name: str | None) -> list[dict[str, Any]]:
        """The tools' functions a grammar offers: all, or the one named."""
        return functions(self.tools, name)


class ExtractStreamer:
    """Text deltas in; content and ToolCallDeltas out, as `extract` on the text so far grows:
    id and name once, then argument pieces. Same interface as tool_calls.ToolCallStreamer."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self._text = ""
        self._content = 0  # content characters sent
        self._calls: list[int] = []  # per call, argument characters sent
        self.num_calls = 0

    def feed(self, delta: str) -> list[str | ToolCallDelta]:
        self._text += delta
        return self._diff(self.parser.extract(self._text, final=False))

    def flush(self) -> list[str | ToolCallDelta]:
        return self._diff(self.parser.extract(self._text, final=True))

    def _diff(self, now: Extracted) -> list[str | ToolCallDelta]:
        out: list[str | ToolCallDelta] = []
        if len(now.content) > self._content:
            out.append(now.content[self._content :])
            self._content = len(now.content)
        for i, (name, args) in enumerate(now.calls):
            if i == len(self._calls):
                out.append(ToolCallDelta(i, "", self.parser.new_id(), name))
                self._calls.append(0)
            if len(args) > self._calls[i]:
                out.append(ToolCallDelta(i, args[self._calls[i] :]))
                self._calls[i] = len(args)
        self.num_calls = len(self._calls)
        return out


def text_before(text: str, tag: str, final: bool) -> tuple[str, int]:
    """The content before `tag` and where the tag ends (-1: not there yet). Whitespace before a
    call is no content; until the end, a cut tag and trailing whitespace are held back."""
    at = text.find(tag)
    if at >= 0:
        return text[:at].rstrip(), at + len(tag)
    if final:
        return text, -1
    head = text[: len(text) - partial_suffix(text, tag)]
    return head.rstrip(), -1


def json_end(text: str, start: int) -> int:
    """Where the JSON value starting at `start` ends (after it), or -1 if it is cut short."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


# a call object's head: the name first, then its arguments' key (the value follows)
CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


def json_call(text: str, at: int, final: bool) -> tuple[tuple[str, str] | None, int]:
    """The call object at `at` (name-first, arguments as an object): ((name, arguments so
    far), where the object ends or -1 while open); (None, -1) if no call head is there."""
    m = CALL_HEAD.match(text, at)
    if m is None:
        if final:  # another key order: the whole object at once
            rest = text[at:]
            try:
                obj, end = json.JSONDecoder().raw_decode(text, at + len(rest) - len(rest.lstrip()))
            except ValueError:
                return None, -1
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                args = obj.get("arguments", obj.get("parameters", {}))
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                return (obj["name"], args), end
        return None, -1
    name = json.loads(f'"{m.group(1)}"')
    start = m.end()
    if start >= len(text):
        return (name, ""), -1
    end = json_end(text, start)
    if end < 0:
        return (name, text[start:]), -1
    close = text.find("}", end)  # the call object's own closing brace
    return (name, text[start:end]), (close + 1 if close >= 0 else -1)


def start_lines(open_text: str, open_id: int | None, body: str, auto: bool) -> list[str]:
    """Lark `start`: the opening tag then `body`; `auto`: free text, or text up to the tag (a
    lazy trigger, or its special token) then `body`."""
    if not auto:
        return [f"start: open_tag {body}", f"open_tag: {tag(open_text, open_id)}"]
    head = "head_text" if open_id is None else f"head_text | TEXT <[{open_id}]>"
    return [
        f"start: TEXT | head {body}",
        f"head: {head}",
        f"head_text[lazy]: TEXT {json.dumps(open_text)}",
        r"TEXT: /(.|\n)*/",
    ]
