"""A reasoning parser: `<think>…</think>` split off the reply (whole or streamed), and the
decoding constraint moved behind it, as vLLM applies structured outputs after the reasoning."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from scheduler import StructuredOutputsParams
from server.constraints import tag
from server.tool_calls import partial_suffix


@dataclass(slots=True)
class ReasoningDelta:
    """What one piece of model text adds to the reasoning and to the content (either may be "")."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """`<think>` reasoning `</think>` content. A family sets its tags and `implicit_start`: whether
    an output whose prompt opened no tag starts inside the reasoning (DeepSeek-R1) or only when
    its first text is the start tag (Qwen3). Reasoning is stripped; content loses its leading
    whitespace after the end tag; whole replies and the joined stream are the same."""

    name = ""
    start_tag = "<think>"
    end_tag = "</think>"
    implicit_start = False
    keep_special_tokens = False  # the tags are special tokens: skip_special_tokens off

    def starts_in_reasoning(self, prompt_tail: str, continued: str | None = None) -> bool | None:
        """True: the prompt ends inside a reasoning block (its template opened it); False: it
        closed one (e.g. `enable_thinking: false`); None: the model may open one itself.
        `continued`: the assistant text a `continue_final_message` reply goes on from."""
        if continued is not None:
            start, end = continued.rfind(self.start_tag), continued.rfind(self.end_tag)
            if start > end:
                return True  # a reasoning block left open for the model to finish
            if end >= 0:
                return False
        tail = prompt_tail.rstrip()
        if tail.endswith(self.start_tag):
            return True
        if tail.endswith(self.end_tag):
            return False
        return True if self.implicit_start else None

    def streamer(self, in_reasoning: bool | None) -> ReasoningStreamer:
        """A fresh stream parser for one choice; `in_reasoning` from starts_in_reasoning."""
        return ReasoningStreamer(self, in_reasoning)

    def parse(self, text: str, in_reasoning: bool | None) -> tuple[str | None, str | None]:
        """A whole reply → (reasoning, content); None where there is none (the stream's parser)."""
        s = self.streamer(in_reasoning)
        deltas = [s.feed(text), s.flush()]
        reasoning = "".join(d.reasoning for d in deltas)
        content = "".join(d.content for d in deltas)
        return (reasoning or None), (content or None)

    def constraint(
        self,
        spec: StructuredOutputsParams,
        in_reasoning: bool | None,
        tag_ids: tuple[int | None, int | None] = (None, None),
    ) -> StructuredOutputsParams:
        """`spec` applied after the reasoning: free text up to the end tag first (where the
        reasoning is open or may be opened), then `spec`. `tag_ids`: special token ids of the
        start and end tags, if any. The wrapper is one Lark grammar around the original."""
        if in_reasoning is False:
            return spec
        start_id, end_id = tag_ids
        think = "think_text" if end_id is None else f"think_text | TEXT <[{end_id}]>"
        lines = [
            "%llguidance {}",
            "start: think body" if in_reasoning else "start: open think body | body",
            f"open: {tag(self.start_tag, start_id)}",
            f"think: {think}",
            f"think_text[lazy]: TEXT {json.dumps(self.end_tag)}",
            r"TEXT: /(.|\n)*/",
            f"body: {_body(spec)}",
        ]
        return StructuredOutputsParams("grammar", "\n".join(lines), param=spec.param)


def _body(spec: StructuredOutputsParams) -> str:
    """One constraint as a Lark expression (a nested grammar for a grammar)."""
    if spec.kind in ("json", "json_object"):
        schema = json.loads(spec.spec) if spec.kind == "json" else {"type": "object"}
        if isinstance(schema, dict) and spec.kind == "json":
            schema.setdefault("x-guidance", {"whitespace_flexible": False})
        return f"%json {json.dumps(schema)}"
    if spec.kind == "choice":
        return " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec.spec))
    if spec.kind == "regex":
        return "%lark {\nstart: /" + _slash_escaped(spec.spec) + "/\n}"
    text = spec.spec
    if "::=" in text and not re.search(r"^\s*start\s*:", text, re.M):  # GBNF, as grammar_of
        from llguidance.gbnf_to_lark import gbnf_to_lark

        text = gbnf_to_lark(text)
    return "%lark {\n" + text + "\n}"


def _slash_escaped(regex: str) -> str:
    """A regex inside Lark's /…/: each unescaped slash escaped."""
    out, escaped = [], False
    for ch in regex:
        out.append("\\/" if ch == "/" and not escaped else ch)
        escaped = ch == "\\" and not escaped
    return "".join(out)


class ReasoningStreamer:
    """Text deltas in, ReasoningDeltas out. A tag cut across deltas is held back until it is
    whole (or cannot be), as are whitespace runs that may end the reasoning."""

    def __init__(self, parser: ReasoningParser, in_reasoning: bool | None) -> None:
        self.parser = parser
        # open: a start tag may come first (skipped), then `_then`; think; content
        self._state = "content" if in_reasoning is False else "open"
        self._then = "think" if in_reasoning else "content"
        self._buf = ""
        self._lead = True  # nothing sent yet in this state: its leading whitespace is dropped

    @property
    def in_reasoning(self) -> bool:
        return self._state == "think"

    def feed(self, delta: str) -> ReasoningDelta:
        self._buf += delta
        out = ReasoningDelta()
        while self._step(out, final=False):
            pass
        return out

    def flush(self) -> ReasoningDelta:
        """The end of the reply: held text goes where it belongs (a cut reasoning stays one)."""
        out = ReasoningDelta()
        while self._step(out, final=True):
            pass
        rest, self._buf = self._buf, ""
        if self._state == "think":
            out.reasoning += rest.rstrip() if not self._lead else rest.strip()
        else:
            out.content += rest.lstrip() if self._lead and self._state != "open" else rest
        return out

    def _step(self, out: ReasoningDelta, final: bool) -> bool:
        """Consume what the state can; True if the state changed (loop again)."""
        p, buf = self.parser, self._buf
        if self._state == "open":
            head = buf.lstrip()
            if head.startswith(p.start_tag):
                self._buf, self._state = head[len(p.start_tag) :], "think"
                return True
            if not final and p.start_tag.startswith(head):
                return False  # all whitespace, or a cut start tag: wait
            # NOTE: content that opens no reasoning keeps its text as the model wrote it
            self._state, self._lead = self._then, self._then == "think"
            return True
        if self._state == "content":
            text = buf.lstrip() if self._lead else buf
            out.content += text
            self._lead = self._lead and not text
            self._buf = ""
            return False
        end = buf.find(p.end_tag)
        if end >= 0:
            out.reasoning += buf[:end].strip() if self._lead else buf[:end].rstrip()
            self._buf, self._state, self._lead = buf[end + len(p.end_tag) :], "content", True
            return True
        if final:
            return False
        keep = _held(buf, p.end_tag)
        text = buf[: len(buf) - keep]
        if self._lead:
            text = text.lstrip()
        out.reasoning += text
        self._lead = self._lead and not text
        self._buf = buf[len(buf) - keep :]
        return False


def _held(text: str, end_tag: str) -> int:
    """How many trailing chars to hold back: a cut `tag`, or whitespace the tag may follow."""
    cut = partial_suffix(text, end_tag)
    body = text[: len(text) - cut]
    return cut + len(body) - len(body.rstrip())
