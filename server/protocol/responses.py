"""OpenAI Responses API shapes (/v1/responses) as pydantic models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError

from server.protocol.base import _Request

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ContentPart(_Request):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str = ""
    refusal: str | None = None
    annotations: Any = None
    logprobs: Any = None


def _check_parts(content: Any) -> None:
    """Images, audio and files get a 400 naming their type (text-only models)."""
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise PydanticCustomError(
                "unsupported",
                f"content part type {kind!r} is not supported: tokenmill serves text-only "
                f"models (supported: {', '.join(TEXT_PARTS)})",
            )


class MessageItem(_Request):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or p.refusal or "" for p in self.content)


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.text for p in self.output)


class ReasoningText(_Request):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Request):
    """An earlier turn's reasoning, sent back by agents; with a reasoning parser it goes back to
    the template as the next assistant turn's reasoning_content (interleaved thinking)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: Any = None
    status: str | None = None

    @property
    def text(self) -> str:
        """The reasoning text, or its summary where only that came back (OpenAI's own items)."""
        parts = self.content if self.content else self.summary
        return "\n".join(p.text for p in parts)


InputItem = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
    Field(discriminator="type"),
]


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None
    verbosity: str | None = None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "required", "none"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = None
    max_output_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    store: StrictBool = True
    previous_response_id: str | None = None
    stream: StrictBool = False
    reasoning: dict[str, Any] | None = None  # accepted; reasoning items come from the parser
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    background: StrictBool = False

    @field_validator("input", mode="before")
    @classmethod
    def _typed_items(cls, items: Any) -> Any:
        """Items without `type` are messages (openai-agents sends them so); other types a 400."""
        if not isinstance(items, list):
            return items
        out = []
        for item in items:
            if isinstance(item, dict) and "type" not in item and "role" in item:
                item = {**item, "type": "message"}
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ITEM_TYPES:
                raise PydanticCustomError(
                    "unsupported",
                    f"input item type {kind!r} is not supported (supported: "
                    f"{', '.join(ITEM_TYPES)})",
                )
            if kind == "message":
                _check_parts(item.get("content"))
            out.append(item)
        return out

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, tools: Any) -> Any:
        """Hosted tools (web search, file search, computer use) are OpenAI's, not a model's."""
        for tool in tools if isinstance(tools, list) else ():
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise PydanticCustomError(
                    "unsupported", f"tool type {kind!r} is not supported: only 'function'"
                )
        return tools


# ---- responses ----


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseObject(BaseModel):
    """What POST answers, GET returns and the stream's response.* events carry."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]]  # reasoning, message and function_call items
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
