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

from tests.deploy.deploy_helpers import MODEL_NAME, REPO, Proc, require_tool, run_load

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
