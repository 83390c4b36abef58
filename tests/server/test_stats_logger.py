"""StatsLogger: vLLM's periodic throughput line, only when something ran, at most per interval."""

from __future__ import annotations

import logging

import pytest

from scheduler.outputs import SchedulerStats
from server.metrics import StatsLogger

pytestmark = pytest.mark.timeout(10)


def test_logs_throughput_then_stays_quiet_when_idle(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.metrics")
    stats_logger = StatsLogger(interval_s=0.0)
    busy = SchedulerStats(num_running=2, num_waiting=1, kv_cache_usage=0.5,
                          prompt_tokens_total=100, generation_tokens_total=40,
                          prefix_cache_queries_total=64, prefix_cache_hits_total=16)  # fmt: skip
    stats_logger(busy, [])
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 50.0%" in line
    assert "Prefix cache hit rate: 25.0%" in line and "Avg generation throughput" in line
    idle = SchedulerStats(prompt_tokens_total=100, generation_tokens_total=40,
                          prefix_cache_queries_total=64, prefix_cache_hits_total=16)  # fmt: skip
    stats_logger(idle, [])  # nothing new and nothing running: no line
    assert len(caplog.records) == 1


def test_at_most_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.metrics")
    stats_logger = StatsLogger(interval_s=3600.0)
    stats_logger(SchedulerStats(num_running=1, generation_tokens_total=5), [])
    assert caplog.records == []
