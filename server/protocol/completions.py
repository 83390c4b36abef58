"""/v1/completions request and response shapes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from scheduler import SamplingParams
from scheduler.errors import SamplingParamsError
from server.protocol.base import PromptLogprobs, UsageInfo, _Omitting, _Response
from server.protocol.sampling import _SamplingRequest


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


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


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
