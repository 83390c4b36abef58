"""/v1/chat/completions request, response and stream chunk shapes."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from scheduler import SamplingParams
from scheduler.errors import SamplingParamsError
from server.protocol.base import PromptLogprobs, UsageInfo, _Omitting, _Request, _Response
from server.protocol.sampling import _SamplingRequest


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = "{}"


class ToolCallMessage(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_template(self) -> dict[str, Any]:
        """Arguments as an object, as Hugging Face templates expect (text if not JSON)."""
        try:
            args: Any = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        function = {"name": self.function.name, "arguments": args}
        return {"id": self.id, "type": "function", "function": function}


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # vLLM's name for an assistant's earlier reasoning
    reasoning_content: str | None = None  # DeepSeek's and the AI SDK's name for it

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """Name the unsupported part type (image, audio) instead of a union's two errors."""
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    "unsupported", f"content part type {kind!r} is not supported: only 'text'"
                )
        return content

    def to_template(self) -> dict[str, Any]:
        """The dict the chat template expects: text parts joined by newlines, developer → system;
        tool calls with their arguments as objects (as Hugging Face templates expect)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        msg: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        reasoning = self.reasoning if self.reasoning is not None else self.reasoning_content
        if reasoning is not None:  # both names: templates read one or the other
            msg["reasoning"] = msg["reasoning_content"] = reasoning
        if self.name is not None and role == "tool":
            msg["name"] = self.name
        return msg


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDefinition(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None  # None: up to the context length
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False

    @property
    def tool_mode(self) -> str:
        """none (no tools or tool_choice none), auto, required, or named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def to_sampling_params(self) -> SamplingParams:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise SamplingParamsError("tool_choice needs tools", "tool_choice")
        if self.continue_final_message and self.add_generation_prompt:
            raise SamplingParamsError(
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        if not self.messages:
            raise SamplingParamsError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamsError("top_logprobs needs logprobs set to true", "top_logprobs")
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs)
        except SamplingParamsError as e:
            if e.param == "logprobs":
                e.param = "top_logprobs"
            raise


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Omitting):
    _omit = ("tool_calls", "reasoning", "reasoning_content")  # only when there are some

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning: str | None = None  # with --reasoning-parser (vLLM's name)
    reasoning_content: str | None = None  # the same text (DeepSeek's and the AI SDK's name)
    tool_calls: list[ToolCallMessage] | None = None  # the request's shape, as vLLM does


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    _omit = ("timings", "prompt_logprobs")

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, only when asked for


class DeltaFunction(_Omitting):
    _omit = ("name", "arguments")

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Omitting):
    _omit = ("id", "type")

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(_Omitting):
    _omit = ("role", "content", "reasoning", "reasoning_content", "tool_calls")

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
