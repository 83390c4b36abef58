"""What every request and response shape shares: strict fields with unknown ones logged once,
OpenAI's omitted-when-empty fields, usage, llama-server's timings and vLLM's prompt logprobs."""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    StrictBool,
    model_serializer,
    model_validator,
)

logger = logging.getLogger(__name__)


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


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry for one token id."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token (the first None), token id -> its entry
PromptLogprobs = list[dict[str, PromptLogprob] | None]
