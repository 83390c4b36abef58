"""OpenAI request/response shapes as pydantic models, and the one translation to SamplingParams."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from scheduler import SamplingParams, StructuredOutputsParams
from scheduler.errors import SamplingParamsError

logger = logging.getLogger(__name__)


# Fields OpenAI clients may send for features tokenmill does not have: a 400 that says so, never
# a silently different answer (their neutral values pass). Any other unknown field is ignored with
# a warning, as vLLM does, so SDKs that add optional fields keep working.
UNSUPPORTED = {
    "functions": "function calling (the legacy `functions`: use `tools`)",
    "function_call": "function calling (the legacy `function_call`: use `tool_choice`)",
    "best_of": "best_of > 1",
    "modalities": "non-text output",
    "audio": "audio output",
}
NEUTRAL = {"best_of": (1,), "modalities": (["text"],)}
# vLLM's guided-decoding fields: guided_KIND, KIND as in `structured_outputs`
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# sampling fields a request may omit (None): SamplingParams' default, or the generation config's
OPTIONAL_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
OPTIONAL_SAMPLING += ("top_k", "min_p", "repetition_penalty")  # vLLM's extras


# the unknown fields of the request being validated (its nested parts add theirs): one log line
_UNKNOWN: ContextVar[list[str] | None] = ContextVar("_UNKNOWN", default=None)
MAX_LOGGED_FIELDS = 8  # names in that line, each cut to 64 characters


class _Request(BaseModel):
    """ "5" is not an int; other unknown fields are ignored (and logged), as vLLM does."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="wrap")
    @classmethod
    def _log_extra(cls, data: Any, handler: ModelWrapValidatorHandler[_Request]) -> _Request:
        """One WARNING per request however many unknown fields it (or its parts) carries."""
        outer = _UNKNOWN.get() is None
        token = _UNKNOWN.set([]) if outer else None
        try:
            model = handler(data)
            _UNKNOWN.get().extend(model.model_extra or ())
            names = list(dict.fromkeys(_UNKNOWN.get()))
        finally:
            if token is not None:
                _UNKNOWN.reset(token)
        if outer and names:
            shown = ", ".join(repr(n[:64]) for n in names[:MAX_LOGGED_FIELDS])
            extra = len(names) - MAX_LOGGED_FIELDS
            more = f" (+{extra} more)" if extra > 0 else ""
            logger.warning("ignoring %d unknown request field(s): %s%s", len(names), shown, more)
        return model


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
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    prompt_logprobs: StrictInt | None = None  # vLLM's: logprobs of the prompt tokens (not stream)
    modalities: Any = None
    audio: Any = None
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True

    @field_validator(*UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        """A feature we lack is a 400 naming it; null, [], {} and neutral values pass."""
        field = info.field_name
        if value not in (None, [], {}) and value not in NEUTRAL.get(field, ()):
            raise PydanticCustomError(
                "unsupported", f"{UNSUPPORTED[field]} is not supported by tokenmill"
            )
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def structured(self) -> StructuredOutputsParams | None:
        """The one decoding constraint asked for (response_format, guided_*, structured_outputs)."""
        asked = [(name.removeprefix("guided_"), getattr(self, name), name) for name in _GUIDED]
        rf = self.response_format
        if rf is not None and rf.get("type") != "text":
            kind, js = rf.get("type"), rf.get("json_schema")
            if kind not in ("json_object", "json_schema"):
                raise SamplingParamsError(
                    "response_format type must be 'text', 'json_object' or 'json_schema', "
                    f"got {kind!r}",
                    "response_format",
                )
            schema = js.get("schema", js.get("json_schema")) if isinstance(js, dict) else None
            if kind == "json_schema" and not isinstance(schema, dict):
                raise SamplingParamsError(
                    "response_format json_schema needs json_schema.schema (an object)",
                    "response_format",
                )
            spec = ("json", schema) if kind == "json_schema" else ("json_object", True)
            asked.insert(0, (*spec, "response_format"))
        for key, value in (self.structured_outputs or {}).items():
            if key not in ("json", "json_object", "regex", "choice", "grammar"):
                raise SamplingParamsError(
                    f"structured_outputs.{key} is not supported: use json, json_object, regex, "
                    "choice or grammar",
                    "structured_outputs",
                )
            asked.append((key, value, "structured_outputs"))
        found = [_constraint(*a) for a in asked if a[1] is not None and a[1] is not False]
        if len(found) > 1:
            raise SamplingParamsError(
                "only one constraint may be given, got "
                + ", ".join(f"{c.param} ({c.kind})" for c in found),
                found[1].param,
            )
        return found[0] if found else None

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        """Build and validate SamplingParams; raises SamplingParamsError with .param."""
        if self.prompt_logprobs is not None and self.stream:
            raise SamplingParamsError(
                "prompt_logprobs is not available with stream (as vLLM)", "prompt_logprobs"
            )
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
        given = {k: getattr(self, k) for k in OPTIONAL_SAMPLING if getattr(self, k) is not None}
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=self.structured(),
            **given,
        )


def _constraint(kind: str, value: Any, param: str) -> StructuredOutputsParams:
    """A guided_* / structured_outputs value → a constraint spec, checked for its shape."""
    if kind == "json_object":
        return StructuredOutputsParams("json_object", "", param)
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise SamplingParamsError(f"{param} is not valid JSON: {e}", param) from e
        if not isinstance(value, dict):
            raise SamplingParamsError(f"{param} must be a JSON schema object", param)
        return StructuredOutputsParams("json", json.dumps(value), param)
    if kind == "choice":
        strings = isinstance(value, list) and all(isinstance(c, str) and c for c in value)
        if not strings or not value:
            raise SamplingParamsError(
                f"{param} must be a non-empty list of non-empty strings", param
            )
        return StructuredOutputsParams("choice", json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise SamplingParamsError(f"{param} must be a non-empty string", param)
    return StructuredOutputsParams(kind, value, param)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    tools: Any = None
    tool_choice: Any = None

    @field_validator("tools", "tool_choice", mode="before")
    @classmethod
    def _chat_only(cls, value: Any, info: ValidationInfo) -> Any:
        """Tool calling needs a chat: a 400 here, not a silently tool-less completion."""
        if value not in (None, [], "none"):
            raise PydanticCustomError(
                "unsupported", f"{info.field_name} is only supported on /v1/chat/completions"
            )
        return value

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix is not None:
            raise SamplingParamsError("suffix is not supported by this model", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise SamplingParamsError("max_tokens must be at least 1 without echo", "max_tokens")
        if isinstance(self.prompt, list) and (
            not self.prompt or any(isinstance(p, list | str) and not p for p in self.prompt)
        ):
            raise SamplingParamsError("prompt must not be empty", "prompt")
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:  # the echoed prompt's logprobs
            prompt_logprobs = max(prompt_logprobs or 0, self.logprobs)
        # NOTE: echo with max_tokens 0 samples one token the response leaves out (vLLM's way)
        max_tokens = 1 if self.echo_only else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) and nothing generated."""
        return self.echo and self.max_tokens == 0


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
    draft_n: int | None = None  # speculative tokens drafted (left out when none, as llama's)
    draft_n_accepted: int | None = None

    @model_serializer(mode="wrap")
    def _drop_draft(self, handler: Any) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None or k[:5] != "draft"}


class _Omitting(BaseModel):
    """Leaves out the `_omit` fields when None or empty, as OpenAI omits them (no null)."""

    _omit: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict:
        return {
            k: v for k, v in handler(self).items() if k not in self._omit or v not in (None, [])
        }


class _Response(_Omitting):
    """What every generation response and chunk carries; `timings` only when opted in."""

    _omit = ("timings",)

    id: str
    object: str  # each response's Literal
    created: int
    model: str
    timings: Timings | None = None


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry for one token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token (the first None), token id -> its entry
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Omitting):
    _omit = ("prompt_logprobs",)  # only when asked for

    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
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
