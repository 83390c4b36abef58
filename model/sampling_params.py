"""SamplingParams: what one request asks of the sampler and of the stop checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names the field and the value."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


MAX_LOGPROBS = 20  # top logprobs a request may ask for (the server's --max-logprobs default)

_KINDS = {
    "json": "JSON schema",
    "json_object": "JSON object",
    "regex": "regular expression",
    "choice": "choice",
    "grammar": "grammar",
}


# (field, check, what the message says) for the range checks; None values are never checked
_RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("n", lambda v: v >= 1, "must be at least 1"),
    ("temperature", lambda v: 0.0 <= v <= 2.0, "must be in [0, 2]"),
    ("top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    ("top_k", lambda v: v >= 0, "must be -1 (disabled), 0 (disabled) or positive"),
    ("min_p", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    ("presence_penalty", lambda v: -2.0 <= v <= 2.0, "must be in [-2, 2]"),
    ("frequency_penalty", lambda v: -2.0 <= v <= 2.0, "must be in [-2, 2]"),
    # NOTE: not (0, 2]: logits / 1e-300 overflow to inf, and NaN probabilities sample -1
    ("repetition_penalty", lambda v: 0.01 <= v <= 2.0, "must be in [0.01, 2]"),
    ("max_tokens", lambda v: v >= 1, "must be at least 1"),
    ("min_tokens", lambda v: v >= 0, "must be at least 0"),
    ("logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
    ("prompt_logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"must be in [0, {MAX_LOGPROBS}]"),
)


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """A decoding constraint as plain text (picklable, hashable: the compile cache key).

    kind: json (spec: the schema as JSON text), json_object (spec ""), regex, choice (spec: a JSON
    list of strings), grammar (Lark, or GBNF with ::=). `param` names the request field in errors.
    """

    kind: str
    spec: str
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise SamplingParamsError(
                f"constraint kind must be one of {sorted(_KINDS)}, got {self.kind!r}", self.param
            )

    @property
    def what(self) -> str:
        return _KINDS[self.kind]


@dataclass(slots=True)
class SamplingParams:
    """vLLM's names and defaults; validated at construction so the engine never sees bad values."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0: the sampled token's; k: plus the top k
    prompt_logprobs: int | None = None  # as logprobs, for each prompt token after the first
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # decoding constrained to this

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        for param, ok, why in _RANGES:
            value = getattr(self, param)
            if value is not None and not ok(value):
                raise SamplingParamsError(f"{param} {why}, got {value!r}", param)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                f"min_tokens {self.min_tokens} must not exceed max_tokens {self.max_tokens}",
                "min_tokens",
            )
        for tok, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise SamplingParamsError(
                    f"logit_bias for token {tok} must be in [-100, 100], got {bias}", "logit_bias"
                )
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop strings must not be empty", "stop")

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
