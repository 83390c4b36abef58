"""ServerMetrics' vLLM-named gauges: on when asked (the server's default), off by the flag."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from scheduler.outputs import SchedulerStats
from server.cli import configs, make_parser
from server.metrics import ServerMetrics

pytestmark = pytest.mark.timeout(30)

VLLM = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render(None)[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_vllm_gauges_follow_the_engine_with_model_name_label() -> None:
    metrics = ServerMetrics("tiny", registry=CollectorRegistry(), vllm_gauges=True)
    metrics.stat_listener(SchedulerStats(num_running=3, num_waiting=5, kv_cache_usage=0.375), [])
    got = {k: v for k, v in samples(metrics).items() if k[0] in VLLM}
    label = (("model_name", "tiny"),)
    assert got == {(VLLM[0], label): 3.0, (VLLM[1], label): 5.0, (VLLM[2], label): 0.375}
    metrics.stat_listener(SchedulerStats(num_running=0, num_waiting=1, kv_cache_usage=1.0), [])
    got = {k[0]: v for k, v in samples(metrics).items() if k[0] in VLLM}
    assert got == {VLLM[0]: 0.0, VLLM[1]: 1.0, VLLM[2]: 1.0}
    # tokenmill's own names are unchanged beside them
    assert samples(metrics)[("tokenmill_num_requests_waiting", label)] == 1.0


def test_vllm_gauges_off_by_default_in_the_class_and_by_the_flag() -> None:
    metrics = ServerMetrics("tiny", registry=CollectorRegistry())
    metrics.stat_listener(SchedulerStats(num_running=3), [])
    assert not [k for k in samples(metrics) if k[0].startswith("vllm:")]
    assert configs(make_parser().parse_args(["serve"]))[1].vllm_metrics is True
    off = configs(make_parser().parse_args(["serve", "--disable-vllm-metrics"]))[1]
    assert off.vllm_metrics is False


def test_spec_decode_counters_and_acceptance_histogram() -> None:
    """vLLM's spec_decode counters beside tokenmill's, advanced by the engine's totals."""
    metrics = ServerMetrics("tiny", registry=CollectorRegistry(), vllm_gauges=True)
    stats = SchedulerStats(num_steps_total=1, spec_decode_num_drafts_total=2,
                           spec_decode_num_draft_tokens_total=7,
                           spec_decode_num_accepted_tokens_total=4,
                           step_acceptance_lengths=[1, 4])  # fmt: skip
    metrics.stat_listener(stats, [])
    got, label = samples(metrics), (("model_name", "tiny"),)
    for prefix in ("vllm:", "tokenmill_"):
        assert got[(f"{prefix}spec_decode_num_drafts_total", label)] == 2
        assert got[(f"{prefix}spec_decode_num_draft_tokens_total", label)] == 7
        assert got[(f"{prefix}spec_decode_num_accepted_tokens_total", label)] == 4
    assert got[("tokenmill_spec_decode_acceptance_length_count", label)] == 2
    assert got[("tokenmill_spec_decode_acceptance_length_sum", label)] == 5
