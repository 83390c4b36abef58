"""A real Prometheus: promtool on our configs; every Grafana panel query answers after a load."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.deploy_helpers import (
    MODEL_NAME,
    REPO,
    VLLM_RULES,
    Proc,
    require_tool,
    run_load,
)

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tokenmill.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
# Grafana's template variables, as Grafana would substitute them for this test's scrape setup.
VARIABLES = {"$__rate_interval": "1m", "$model_name": MODEL_NAME}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with variables substituted) for every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for var, val in VARIABLES.items():
                expr = expr.replace(var, val)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            out.append((panel["title"], expr))
    return out


def promtool(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("promtool"), *args], input=input, capture_output=True, timeout=60
    )


@pytest.mark.timeout(60)
def test_promtool_checks_compose_config() -> None:
    r = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


@pytest.mark.timeout(60)
def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The config check can fail: a scrape job without a name is an error."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    del config["scrape_configs"][0]["job_name"]
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump(config))
    assert promtool("check", "config", str(bad)).returncode != 0


@pytest.mark.timeout(30)
def test_dashboard_queries_are_valid_promql_shapes() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 15
    text = " ".join(q for _, q in queries)
    for needed in (
        "tokenmill_generation_tokens_total",
        "tokenmill_num_requests_running",
        "tokenmill_num_requests_waiting",
        "tokenmill_time_to_first_token_seconds_bucket",
        "tokenmill_inter_token_latency_seconds_bucket",
        "tokenmill_e2e_request_latency_seconds_bucket",
        "tokenmill_kv_cache_usage_ratio",
        "tokenmill_num_preemptions_total",
        "tokenmill_prefix_cache_hits_total",
        'finished_reason="error"',
    ):
        assert needed in text, needed
    for q in (0.5, 0.99):
        assert f"histogram_quantile({q}, sum by (le) (rate(tokenmill_time_to" in text


def _query(prom: Proc, expr: str) -> list[float]:
    r = httpx.get(prom.url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return [float(item["value"][1]) for item in body["data"]["result"]]


@pytest.mark.timeout(180)
def test_every_dashboard_query_returns_data(prometheus: Proc, tokenmill_server: Proc) -> None:
    run_load(tokenmill_server.url, concurrency=4)
    queries = dashboard_queries()

    def unanswered() -> list[str]:
        """Queries with no finite value yet (a histogram needs a scrape after its first sample)."""
        out = []
        for title, expr in queries:
            values = _query(prometheus, expr)
            if not any(math.isfinite(v) for v in values):
                out.append(f"{title}: {expr} -> {values}")
        return out

    deadline = time.monotonic() + 60
    while (left := unanswered()) and time.monotonic() < deadline:
        time.sleep(1.0)  # polling Prometheus' scrape cadence (1 s), bounded by the deadline
    assert not left, "dashboard queries without data:\n" + "\n".join(left)
    # The load is visible through Prometheus, not just present as zeros.
    gen = _query(prometheus, queries[0][1])
    assert re.search("generation_tokens", queries[0][1]) and gen[0] > 0


# --- vLLM's metric names as recording rules -------------------------------------------------

K8S_RULES = REPO / "deploy" / "k8s" / "prometheus-operator" / "prometheusrule.yaml"
# What dashboards, KEDA/HPA rules and inference gateways written for vLLM query.
VLLM_NAMES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
} | {
    f"vllm:{h}{suffix}"
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prompt_tokens", "request_generation_tokens")
    for suffix in ("_bucket", "_sum", "_count")
}  # fmt: skip


def vllm_rules() -> list[dict]:
    (group,) = yaml.safe_load(VLLM_RULES.read_text())["groups"]
    return group["rules"]


@pytest.mark.timeout(60)
def test_promtool_checks_vllm_rules(tmp_path: Path) -> None:
    r = promtool("check", "rules", str(VLLM_RULES))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert f"{len(vllm_rules())} rules found" in r.stdout.decode()
    broken = tmp_path / "broken.yml"
    broken.write_text(
        VLLM_RULES.read_text().replace("expr: tokenmill_", "expr: rate(tokenmill_", 1)
    )
    assert promtool("check", "rules", str(broken)).returncode != 0


@pytest.mark.timeout(30)
def test_vllm_rules_cover_vllm_names_from_exported_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from server.metrics import ServerMetrics
    from tests.deploy.deploy_helpers import parse_samples

    metrics = ServerMetrics("m", registry=CollectorRegistry())
    metrics.count_http("/x", 200, 0.1)
    exported = {name for name, _ in parse_samples(metrics.render(None)[0].decode())}
    rules = vllm_rules()
    assert VLLM_NAMES <= {r["record"] for r in rules}
    for rule in rules:
        assert rule["expr"] in exported, rule
    # The operator's PrometheusRule holds the same rules; compose's config loads the file.
    k8s = yaml.safe_load(K8S_RULES.read_text())
    assert k8s["spec"] == yaml.safe_load(VLLM_RULES.read_text())
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["rules/*.yml"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/rules:/etc/prometheus/rules:ro" in volumes


@pytest.mark.timeout(180)
def test_vllm_names_evaluate_to_tokenmill_values(prometheus: Proc, tokenmill_server: Proc) -> None:
    """After a load, every recorded vllm: series equals its source in the real Prometheus."""
    run_load(tokenmill_server.url, concurrency=2, max_tokens=8)
    pairs = [(f"sum({r['record']})", f"sum({r['expr']})") for r in vllm_rules()]

    def differing() -> list[str]:
        out = []
        for record, source in pairs:
            got, want = _query(prometheus, record), _query(prometheus, source)
            if not got or got != want:
                out.append(f"{record} = {got}, {source} = {want}")
        return out

    deadline = time.monotonic() + 60
    while (left := differing()) and time.monotonic() < deadline:
        time.sleep(1.0)  # rule evaluation every 1 s, bounded by the deadline
    assert not left, "recorded vLLM series that do not match:\n" + "\n".join(left)
    assert _query(prometheus, 'sum(vllm:generation_tokens_total{model_name="tiny"})')[0] > 0
    # What a KEDA trigger and a latency panel written for vLLM would ask.
    assert _query(prometheus, f'sum(vllm:num_requests_waiting{{model_name="{MODEL_NAME}"}})')
    p90 = "histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[1m])))"
    assert all(math.isfinite(v) for v in _query(prometheus, p90))
