"""Anthropic Messages API shapes (/v1/messages, /v1/messages/count_tokens) as pydantic models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from server.protocol.base import _Request

# Block types a text model can take; images, documents and server-side blocks are refused by name.
BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking", "redacted_thinking")


def _check_blocks(content: Any, allowed: tuple[str, ...] = BLOCK_TYPES) -> Any:
    """A clear 400 for an image or document (tokenmill serves text models), not a union's noise."""
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in allowed:
            what = (
                "are not supported: tokenmill serves text-only models"
                if kind in ("image", "document")
                else "is not supported"
            )
            raise PydanticCustomError(
                "unsupported",
                f"content block type {kind!r} {what} (supported: {', '.join(allowed)})",
            )
    return content


class _Block(_Request):
    cache_control: Any = None  # prompt caching is automatic here (prefix caching)


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    citations: Any = None


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: StrictBool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        return _check_blocks(content, ("text",))

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(b.text for b in self.content)


class ThinkingBlock(_Block):
    """An earlier turn's reasoning, sent back by clients; with a reasoning parser it goes back to
    the template as that turn's reasoning_content (interleaved thinking)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Block):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class AnthropicMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, content: Any) -> Any:
        return _check_blocks(content)


class AnthropicTool(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None  # server tools (web search, bash, ...) are not served
    cache_control: Any = None


class AnthropicToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool = False


class AnthropicThinking(_Request):
    """Extended thinking: enabled or disabled becomes the template's enable_thinking; adaptive
    leaves the template's default. The budget and display are accepted, not enforced."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None
    display: Literal["summarized", "omitted"] | None = None


class _AnthropicPrompt(_Request):
    """What both /v1/messages and count_tokens render: system, messages, tools."""

    model: str
    messages: list[AnthropicMessage]
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinking | None = None  # thinking blocks come from the reasoning parser

    @property
    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "\n".join(b.text for b in self.system)
        return self.system


class AnthropicMessagesRequest(_AnthropicPrompt):
    max_tokens: StrictInt  # required, as Anthropic's API
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class AnthropicCountTokensRequest(_AnthropicPrompt):
    pass


# ---- responses ----


class AnthropicUsage(BaseModel):
    input_tokens: int  # prompt tokens not served from the cache (Anthropic's meaning)
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0  # prompt tokens served from the prefix cache


class AnthropicResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]  # thinking, text and tool_use blocks
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


class AnthropicCountTokensResponse(BaseModel):
    input_tokens: int
