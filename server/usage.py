"""Per-request accounting: usage (with prefix-cache hits) and llama-server-style timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.protocol import PromptTokensDetails, Timings, UsageInfo

if TYPE_CHECKING:
    from scheduler.outputs import RequestMetrics, RequestOutput


def _ms(start: float | None, end: float | None) -> float:
    return 0.0 if start is None or end is None else max(end - start, 0.0) * 1000.0


def _rates(n: int, ms: float) -> tuple[float | None, float | None]:
    """(ms per token, tokens per second); None when nothing was timed."""
    if n <= 0 or ms <= 0.0:
        return None, None
    return ms / n, n * 1000.0 / ms


@dataclass(slots=True)
class RequestAccounting:
    """Fed every engine output of one API request (its prompts × n samples)."""

    prompt_lens: list[int]
    cached: dict[int, int] = field(default_factory=dict)  # prompt index → cached prompt tokens
    metrics: dict[int, RequestMetrics] = field(default_factory=dict)

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.cached[prompt_index] = out.num_cached_tokens
        if out.metrics is not None:
            self.metrics[prompt_index] = out.metrics

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())

    def usage(self, completion_tokens: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def timings(self, completion_tokens: int) -> Timings:
        """Queue, prefill and decode of the request; several prompts: earliest start, latest end.

        NOTE: the first token of each sample comes out of the prefill, so decode rates count the
        tokens after it (completion_tokens minus one per prompt that has produced a token).
        """
        ms = list(self.metrics.values())

        def first(attr: str) -> float | None:
            values = [getattr(m, attr) for m in ms if getattr(m, attr) is not None]
            return min(values) if values else None

        def last(attr: str) -> float | None:
            values = [getattr(m, attr) for m in ms if getattr(m, attr) is not None]
            return max(values) if values else None

        arrival, scheduled = first("arrival_time"), first("first_scheduled_time")
        first_token, last_token = last("first_token_time"), last("last_token_time")
        prompt_n = max(self.prompt_tokens - self.cached_tokens, 0)
        prompt_ms = _ms(scheduled, first_token)
        started = sum(m.first_token_time is not None for m in ms)
        predicted_ms = _ms(first("first_token_time"), last_token)
        prompt_rates = _rates(prompt_n, prompt_ms)
        decode_rates = _rates(completion_tokens - started, predicted_ms)
        return Timings(
            queue_ms=_ms(arrival, scheduled),
            cache_n=self.cached_tokens,
            prompt_n=prompt_n,
            prompt_ms=prompt_ms,
            prompt_per_token_ms=prompt_rates[0],
            prompt_per_second=prompt_rates[1],
            predicted_n=completion_tokens,
            predicted_ms=predicted_ms,
            predicted_per_token_ms=decode_rates[0],
            predicted_per_second=decode_rates[1],
        )
