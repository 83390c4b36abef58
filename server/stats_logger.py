"""The periodic engine summary vLLM logs (throughput, queue, KV use); --disable-log-stats."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.outputs import RequestOutput, SchedulerStats

logger = logging.getLogger(__name__)


class StatsLogger:
    """A stat listener: at most one line every `interval_s` seconds, only after steps ran."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last = (0, 0, 0, 0)  # prompt tokens, generated tokens, prefix queries, prefix hits

    def __call__(self, stats: SchedulerStats, finished: list[RequestOutput]) -> None:
        now = time.monotonic()
        elapsed = now - self._last_time
        if elapsed < self.interval_s:
            return
        totals = (
            stats.prompt_tokens_total,
            stats.generation_tokens_total,
            stats.prefix_cache_queries_total,
            stats.prefix_cache_hits_total,
        )
        prompt, generated, queries, hits = (a - b for a, b in zip(totals, self._last, strict=True))
        self._last_time, self._last = now, totals
        if not (prompt or generated or stats.num_running or stats.num_waiting):
            return
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            prompt / elapsed,
            generated / elapsed,
            stats.num_running,
            stats.num_waiting,
            stats.kv_cache_usage * 100,
            100.0 * hits / queries if queries else 0.0,
        )
