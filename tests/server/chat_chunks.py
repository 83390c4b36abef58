"""Chat chunks as the chat path streams them, for the translations' stream tests."""

from __future__ import annotations

from server.protocol.base import PromptTokensDetails, UsageInfo
from server.protocol.chat import (
    ChatCompletionChunk,
    ChatStreamChoice,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
)


def chunk(
    content: str | None = None,
    call: tuple[str | None, str | None, str] | None = None,
    finish: str | None = None,
    usage: tuple[int, int, int] | None = None,
    reasoning: str | None = None,
) -> ChatCompletionChunk:
    """A content delta, a tool-call delta (id, name, arguments), a finish, the usage chunk
    (prompt, completion, cached tokens), or a reasoning delta (with --reasoning-parser)."""
    head = {"id": "c", "created": 0, "model": "m"}
    if usage is not None:
        details = PromptTokensDetails(cached_tokens=usage[2])
        u = UsageInfo(prompt_tokens=usage[0], completion_tokens=usage[1],
                      total_tokens=usage[0] + usage[1], prompt_tokens_details=details)  # fmt: skip
        return ChatCompletionChunk(**head, choices=[], usage=u)
    calls = None
    if call is not None:
        cid, name, args = call
        fn = DeltaFunction(name=name, arguments=args)
        calls = [DeltaToolCall(index=0, id=cid, type="function" if cid else None, function=fn)]
    delta = DeltaMessage(
        content=content, tool_calls=calls, reasoning=reasoning, reasoning_content=reasoning
    )
    choice = ChatStreamChoice(index=0, delta=delta, finish_reason=finish)
    return ChatCompletionChunk(**head, choices=[choice])
