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


def test_spec_decode_line_over_the_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="server.metrics")
    stats_logger = StatsLogger(interval_s=0.0)
    stats_logger(SchedulerStats(num_running=1, generation_tokens_total=5), [])
    assert len(caplog.records) == 1  # no drafts: no SpecDecoding line
    stats_logger(SchedulerStats(num_running=1, generation_tokens_total=30,
                                spec_decode_num_drafts_total=10,
                                spec_decode_num_draft_tokens_total=40,
                                spec_decode_num_accepted_tokens_total=15), [])  # fmt: skip
    line = caplog.records[-1].getMessage()
    assert "Mean acceptance length: 2.50, Accepted: 15 tokens, Drafted: 40 tokens" in line
    assert "Avg Draft acceptance rate: 37.5%" in line
