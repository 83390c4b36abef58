"""OpenAI request/response shapes as pydantic models, and the one translation to SamplingParams."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from model.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)


# Fields OpenAI clients may send for features tokenmill does not have: a 400 that says so, never
# a silently different answer (their neutral values pass). Any other unknown field is ignored with
# a warning, as vLLM does, so SDKs that add optional fields keep working.
UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "response_format": "structured output",
    "best_of": "best_of > 1",
    "prompt_logprobs": "prompt logprobs",
    "guided_json": "guided decoding",
    "guided_regex": "guided decoding",
    "guided_choice": "guided decoding",
    "guided_grammar": "guided decoding",
    "modalities": "non-text output",
    "audio": "audio output",
}
NEUTRAL = {"tool_choice": ("none",), "best_of": (1,), "modalities": (["text"],)}


class _Request(BaseModel):
    """ "5" is not an int; other unknown fields are ignored (and logged), as vLLM does."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _log_extra(self) -> _Request:
        for field in self.model_extra or {}:
            logger.warning("ignoring unknown request field %r", field)
        return self


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingRequest(_Request):
    """Sampling fields shared by /v1/completions and /v1/chat/completions (plus vLLM's extras)."""

    model: str | None = None
    n: StrictInt = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    timings_per_token: StrictBool = False  # llama-server's opt-in: a `timings` object (ms, tok/s)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    best_of: Any = None
    prompt_logprobs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    modalities: Any = None
    audio: Any = None

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        """A feature we lack is a 400 naming it; null, [], {} and neutral values pass."""
        field = info.field_name
        neutral = value in (None, [], {}) or value in NEUTRAL.get(field, ())
        if field == "response_format" and isinstance(value, dict):
            neutral = value.get("type") == "text"
        if not neutral:
            raise PydanticCustomError(
                "unsupported", f"{UNSUPPORTED[field]} is not supported by tokenmill"
            )
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Build and validate SamplingParams; raises SamplingParamsError with .param."""
        if self.stream_options is not None and not self.stream:
            raise SamplingParamsError(
                "stream_options is only allowed when stream is true", "stream_options"
            )
        bias = None
        if self.logit_bias:
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    bias[int(key)] = float(value)
                except ValueError:
                    raise SamplingParamsError(
                        f"logit_bias keys must be token ids, got {key!r}", "logit_bias"
                    ) from None
        given = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logit_bias=bias,
            logprobs=logprobs,
            **{k: v for k, v in given.items() if v is not None},
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix is not None:
            raise SamplingParamsError("suffix is not supported by this model", "suffix")
        if self.echo and self.logprobs is not None:
            raise SamplingParamsError(
                "echo with logprobs is not supported (no prompt logprobs)", "echo"
            )
        if isinstance(self.prompt, list) and (
            not self.prompt or any(isinstance(p, list | str) and not p for p in self.prompt)
        ):
            raise SamplingParamsError("prompt must not be empty", "prompt")
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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

    def to_template(self) -> dict[str, str]:
        """The dict the chat template expects: text parts joined by newlines, developer → system."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None  # None: up to the context length
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    def to_sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise SamplingParamsError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamsError("top_logprobs needs logprobs set to true", "top_logprobs")
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs)
        except SamplingParamsError as e:
            if e.param == "logprobs":
                e.param = "top_logprobs"
            raise


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]


# ---- responses (serialised with model_dump(); None fields stay as JSON null, as OpenAI sends) ----


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class Timings(BaseModel):
    """llama-server's per-request `timings` (its names), plus queue_ms; only when asked for."""

    queue_ms: float  # arrival → first scheduled
    cache_n: int  # prompt tokens served from the prefix cache
    prompt_n: int  # prompt tokens computed (prompt_tokens - cache_n)
    prompt_ms: float  # first scheduled → first token (prefill)
    prompt_per_token_ms: float | None
    prompt_per_second: float | None
    predicted_n: int  # generated tokens so far, all samples
    predicted_ms: float  # first token → latest token (decode)
    predicted_per_token_ms: float | None
    predicted_per_second: float | None


class _WithTimings(BaseModel):
    """Responses that carry `timings` only when the request opted in (no null field otherwise)."""

    timings: Timings | None = None

    @model_serializer(mode="wrap")
    def _drop_absent_timings(self, handler: Any) -> dict:
        data = handler(self)
        if data.get("timings") is None:
            data.pop("timings", None)
        return data


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionResponse(_WithTimings):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_WithTimings):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict:
        """OpenAI deltas omit absent fields instead of sending null."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_WithTimings):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
