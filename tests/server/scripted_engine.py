"""A scripted engine for in-process serving tests: what the server reads of AsyncEngine, with a
real tokenizer and a fixed reply sent one character (one token) per step; a mock HTTP client
that hands a translated answer to the real SDKs."""

from __future__ import annotations

from typing import Any

import httpx
from parser_cases import template
from sse_starlette import ServerSentEvent

from scheduler.outputs import CompletionOutput, RequestOutput
from server.config import ServerConfig
from server.limits import ServingLimits
from server.offload import Offload
from server.serving_chat import OpenAIServingChat
from server.sse import EventStream, _named


class _Stream:
    """One request's outputs: the reply one character at a time, then finish "stop"."""

    def __init__(self, request_id: str, prompt: list[int], reply: str) -> None:
        self.outputs = [
            RequestOutput(
                request_id,
                prompt,
                [
                    CompletionOutput(
                        0, ch, [k], None, k + 1, "stop" if k == len(reply) - 1 else None
                    )
                ],
                k == len(reply) - 1,
            )
            for k, ch in enumerate(reply)
        ]

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self.outputs:
            raise StopAsyncIteration
        return self.outputs.pop(0)

    def close(self) -> None:
        self.outputs = []


class ScriptedEngine:
    """What the server reads of AsyncEngine, with a real tokenizer and a scripted reply."""

    def __init__(self, tokenizer: Any, reply: str) -> None:
        self.tokenizer = tokenizer
        self.reply = reply
        self.model_name = "scripted"
        self.default_sampling_params: dict[str, Any] = {}
        self.max_model_len = 8192
        self.requests: list[tuple[list[int], Any]] = []  # (prompt ids, SamplingParams)

    def num_waiting(self) -> int:
        return 0

    async def prepare(self, params: list[Any]) -> None:
        """AsyncEngine compiles grammars here; the requests record what would compile."""

    def generate(self, request_id: str, prompt: list[int], params: Any) -> _Stream:
        self.requests.append((prompt, params))
        return _Stream(request_id, prompt, self.reply)


def serving(tokenizer, reply: str, tmpl: str, **flags: Any) -> tuple[OpenAIServingChat, Any]:
    """The chat serving over a scripted engine, with `tmpl` (a chat_templates file) and flags."""
    engine = ScriptedEngine(tokenizer, reply)
    config = ServerConfig(chat_template=template(tmpl), limits=ServingLimits(), **flags)
    return OpenAIServingChat(engine, config, Offload(1)), engine


async def sse_body(stream: EventStream) -> bytes:
    """A named-event stream as the server writes it (server.sse, sse-starlette's encoding)."""
    return b"".join([ServerSentEvent(**e, sep="\n").encode() async for e in _named(stream)])


def mock_http(body: bytes, stream: bool, http: Any = httpx) -> Any:
    """A client of `http` (httpx, or httpx2 for the anthropic SDK) whose every request gets
    `body` (SSE or JSON): the real SDKs parse what the server would send."""
    kind = "text/event-stream" if stream else "application/json"
    return http.Client(
        transport=http.MockTransport(
            lambda _: http.Response(200, content=body, headers={"content-type": kind})
        )
    )
