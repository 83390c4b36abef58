"""The sampling fields /v1/completions and /v1/chat/completions share (plus vLLM's extras), and
their one translation to SamplingParams."""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, StrictInt, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from scheduler import SamplingParams
from scheduler.errors import SamplingParamsError
from server.constraints import structured_outputs
from server.protocol.base import StreamOptions, _Request

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
# sampling fields a request may omit (None): SamplingParams' default, or the generation config's
OPTIONAL_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
OPTIONAL_SAMPLING += ("top_k", "min_p", "repetition_penalty")  # vLLM's extras


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
            structured_outputs=structured_outputs(self),
            **given,
        )
