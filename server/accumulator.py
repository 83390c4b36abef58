"""One API request's outputs gathered once for both endpoints: per-choice text, token counts,
finish reasons and logprobs; engine errors; usage (with prefix-cache hits) and timings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.errors import APIError
from server.protocol.base import PromptTokensDetails, Timings, UsageInfo

if TYPE_CHECKING:
    from scheduler import TokenLogprob
    from scheduler.outputs import CompletionOutput, RequestMetrics, RequestOutput

LOGPROB_FLOOR = -9999.0  # logprobs below it (-inf after masking) are sent as it: JSON has no inf


def _ms(start: float | None, end: float | None) -> float:
    return 0.0 if start is None or end is None else max(end - start, 0.0) * 1000.0


def _rates(n: int, ms: float) -> tuple[float | None, float | None]:
    """(ms per token, tokens per second); None when nothing was timed."""
    if n <= 0 or ms <= 0.0:
        return None, None
    return ms / n, n * 1000.0 / ms


@dataclass(slots=True)
class Choice:
    """One choice (prompt index x n + sample) as gathered so far."""

    text: str = ""
    num_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[Any] = field(default_factory=list)  # the endpoint's entries, one per token


@dataclass(slots=True)
class RequestAccumulator:
    """Fed every engine output of one API request (its prompts x n samples); `convert(choice
    index, token logprobs)` makes the endpoint's logprob entries (legacy or chat shape)."""

    prompt_lens: list[int]
    n: int
    convert: Callable[[int, list[TokenLogprob]], list[Any]]
    timings_on: bool = False  # the request asked for llama-server timings
    choices: list[Choice] = field(default_factory=list)
    cached: dict[int, int] = field(default_factory=dict)  # prompt index → cached prompt tokens
    metrics: dict[int, RequestMetrics] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.choices = [Choice() for _ in range(len(self.prompt_lens) * self.n)]

    async def deltas(
        self, stream: AsyncIterator[tuple[int, RequestOutput]]
    ) -> AsyncIterator[tuple[int, CompletionOutput, list[Any] | None]]:
        """(choice index, the sample's delta, its new logprob entries or None) for every changed
        sample, after adding it to the choice; an engine error raises APIError (500). Closing
        this iterator closes (= aborts) the stream."""
        async with aclosing(stream):
            async for p, out in stream:
                if out.error:
                    raise APIError(f"request {out.request_id} failed: {out.error}", 500)
                self.cached[p] = out.num_cached_tokens
                if out.metrics is not None:
                    self.metrics[p] = out.metrics
                for co in out.outputs:
                    i = p * self.n + co.index
                    c = self.choices[i]
                    c.text += co.text
                    c.num_tokens = co.num_tokens
                    c.finish_reason = co.finish_reason or c.finish_reason
                    entries = None
                    if co.logprobs is not None:
                        entries = self.convert(i, co.logprobs)
                        c.logprobs.extend(entries)
                    yield i, co, entries

    async def drain(self, stream: AsyncIterator[tuple[int, RequestOutput]]) -> None:
        """Gather the whole request (the non-streamed answer)."""
        async with aclosing(self.deltas(stream)) as deltas:
            async for _ in deltas:
                pass

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def timings(self) -> Timings | None:
        """Queue, prefill and decode (None unless asked for); several prompts: earliest start,
        latest end. NOTE: each sample's first token comes out of the prefill, so decode rates
        count the tokens after it (completion_tokens minus one per prompt with a first token)."""
        if not self.timings_on:
            return None

        def times(attr: str) -> list[float]:
            return [t for m in self.metrics.values() if (t := getattr(m, attr)) is not None]

        scheduled = min(times("first_scheduled_time"), default=None)
        first_tokens = times("first_token_time")
        prompt_n = max(self.prompt_tokens - self.cached_tokens, 0)
        prompt_ms = _ms(scheduled, max(first_tokens, default=None))
        predicted_ms = _ms(
            min(first_tokens, default=None), max(times("last_token_time"), default=None)
        )
        prompt_per_token_ms, prompt_per_second = _rates(prompt_n, prompt_ms)
        decoded = self.completion_tokens - len(first_tokens)
        drafted = sum(m.num_draft_tokens for m in self.metrics.values())
        predicted_per_token_ms, predicted_per_second = _rates(decoded, predicted_ms)
        return Timings(
            queue_ms=_ms(min(times("arrival_time"), default=None), scheduled),
            cache_n=self.cached_tokens,
            prompt_n=prompt_n,
            prompt_ms=prompt_ms,
            prompt_per_token_ms=prompt_per_token_ms,
            prompt_per_second=prompt_per_second,
            predicted_n=self.completion_tokens,
            predicted_ms=predicted_ms,
            predicted_per_token_ms=predicted_per_token_ms,
            predicted_per_second=predicted_per_second,
            draft_n=drafted or None,
            draft_n_accepted=sum(m.num_accepted_tokens for m in self.metrics.values())
            if drafted
            else None,
        )
