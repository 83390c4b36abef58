"""ServerMetrics: unit checks on synthetic engine stats, then a real server under a load."""

from __future__ import annotations

import re
import subprocess
import time

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from scheduler.outputs import CompletionOutput, RequestMetrics, RequestOutput, SchedulerStats
from server.metrics import FINISHED_REASONS, ServerMetrics
from server.middleware import HTTPMetricsMiddleware
from tests.deploy.deploy_helpers import (
    MODEL_NAME,
    REPO,
    LoadResult,
    parse_samples,
    require_tool,
    run_load,
    scrape,
    value,
    wait_until,
)

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "tokenmill.json"


def finished_output(
    rid: str, prompt_len: int, tokens: list[int], reason: str = "length", t0: float = 100.0
) -> RequestOutput:
    """Finished request: arrival t0, scheduled +0.5 s, first token +1 s, then 0.25 s a token."""
    outs = [
        CompletionOutput(index=i, text="", token_ids=[], logprobs=None, num_tokens=n,
                         finish_reason=reason)
        for i, n in enumerate(tokens)
    ]  # fmt: skip
    last = t0 + 1.0 + 0.25 * (max(tokens) - 1)
    metrics = RequestMetrics(t0, t0 + 0.5, t0 + 1.0, last, last + 0.01)
    return RequestOutput(rid, list(range(prompt_len)), outs, True, metrics=metrics)


def stats(**kw) -> SchedulerStats:
    base = dict(num_free_blocks=100, num_total_blocks=100, step_duration=0.02, step_num_seqs=2)
    return SchedulerStats(**{**base, **kw})


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics("m", registry=CollectorRegistry())


def samples_of(metrics: ServerMetrics) -> dict:
    body, _ = metrics.render(None)
    return parse_samples(body.decode())


@pytest.mark.timeout(30)
def test_listener_counts_tokens_reasons_and_latencies(metrics: ServerMetrics) -> None:
    metrics.stat_listener(stats(num_running=2, num_waiting=3, kv_cache_usage=0.25), [])
    s = samples_of(metrics)
    assert value(s, "tokenmill_num_requests_running", model_name="m") == 2
    assert value(s, "tokenmill_num_requests_waiting") == 3
    assert value(s, "tokenmill_kv_cache_usage_ratio") == 0.25
    assert value(s, "tokenmill_kv_cache_total_blocks") == 100

    done = [
        finished_output("a", 10, [5], "stop"),
        finished_output("b", 7, [1], "length"),
        finished_output("c", 3, [0], "abort"),
    ]
    done[2].metrics.first_token_time = done[2].metrics.last_token_time = None  # aborted in queue
    metrics.stat_listener(stats(num_preemptions_total=2, prefix_cache_queries_total=20,
                                prefix_cache_hits_total=16, prompt_tokens_total=12,
                                generation_tokens_total=4), done)  # fmt: skip
    # Cumulative engine totals turn into counter increments; a repeated total adds nothing.
    metrics.stat_listener(stats(num_preemptions_total=3, prefix_cache_queries_total=20,
                                prefix_cache_hits_total=16, prompt_tokens_total=17,
                                generation_tokens_total=6), [])  # fmt: skip
    s = samples_of(metrics)
    assert value(s, "tokenmill_prompt_tokens_total") == 17
    assert value(s, "tokenmill_generation_tokens_total") == 6
    assert value(s, "tokenmill_num_preemptions_total") == 3
    assert value(s, "tokenmill_prefix_cache_queries_total") == 20
    assert value(s, "tokenmill_prefix_cache_hits_total") == 16
    for reason, n in {"stop": 1, "length": 1, "abort": 1, "error": 0}.items():
        assert value(s, "tokenmill_requests_finished_total", finished_reason=reason) == n
    assert value(s, "tokenmill_time_to_first_token_seconds_count") == 2
    assert value(s, "tokenmill_time_to_first_token_seconds_sum") == pytest.approx(2.0)
    assert value(s, "tokenmill_e2e_request_latency_seconds_count") == 3
    assert value(s, "tokenmill_request_queue_time_seconds_sum") == pytest.approx(1.5)
    assert value(s, "tokenmill_request_generation_tokens_sum") == 6
    assert value(s, "tokenmill_request_prompt_tokens_sum") == 20
    assert value(s, "tokenmill_step_duration_seconds_count") == 3
    assert value(s, "tokenmill_step_batch_size_sum") == 6


@pytest.mark.timeout(30)
def test_inter_token_latency_is_one_observation_per_gap(metrics: ServerMetrics) -> None:
    """Each step's gaps are observed once: a repeated snapshot of the same step adds nothing."""
    metrics.stat_listener(stats(num_steps_total=1, step_inter_token_latencies=[]), [])
    step = stats(num_steps_total=2, step_inter_token_latencies=[0.25, 0.5, 0.01])
    metrics.stat_listener(step, [])
    metrics.stat_listener(step, [])  # e.g. the listeners' call after a failed step
    metrics.stat_listener(stats(num_steps_total=3, step_inter_token_latencies=[0.03]), [])
    s = samples_of(metrics)
    assert value(s, "tokenmill_inter_token_latency_seconds_count") == 4
    assert value(s, "tokenmill_inter_token_latency_seconds_sum") == pytest.approx(0.79)
    assert value(s, "tokenmill_inter_token_latency_seconds_bucket", le="0.01") == 1


@pytest.mark.timeout(30)
def test_multi_sample_and_error_requests(metrics: ServerMetrics) -> None:
    """n=2: tokens of a sample that finished in an earlier delta still count; errors win."""
    early = finished_output("n2", 4, [3], "stop")
    early.finished = False
    last = finished_output("n2", 4, [9], "length")
    last.outputs[0].index = 1
    err = finished_output("e", 5, [2], "error")
    err.error = "step failed"
    running = finished_output("r", 4, [2], "stop")
    running.finished, running.outputs[0].finish_reason = False, None
    metrics.stat_listener(stats(), [early, running])
    assert set(metrics._sample_tokens) == {"n2"}
    metrics.stat_listener(stats(), [last, err])
    s = samples_of(metrics)
    assert value(s, "tokenmill_request_prompt_tokens_sum") == 9
    assert value(s, "tokenmill_request_generation_tokens_sum") == 3 + 9 + 2
    assert value(s, "tokenmill_requests_finished_total", finished_reason="length") == 1
    assert value(s, "tokenmill_requests_finished_total", finished_reason="error") == 1
    assert value(s, "tokenmill_time_to_first_token_seconds_count") == 2
    assert metrics._sample_tokens == {}


@pytest.mark.timeout(30)
def test_every_metric_has_help_base_units_and_model_label(metrics: ServerMetrics) -> None:
    body, _ = metrics.render(None)
    text = body.decode()
    names = set(re.findall(r"^# TYPE (tokenmill_\w+) (\w+)", text, re.M))
    assert len(names) == 26, sorted(names)  # 22 + 4 for speculative decoding
    for name, kind in names:
        help_line = re.search(rf"^# HELP {name} (.+)$", text, re.M)
        assert help_line and len(help_line.group(1)) > 20, name
        if kind == "counter":
            assert name.endswith("_total"), name
        if "seconds" in name or "latency" in name or "time" in name:
            assert name.endswith("_seconds") and kind == "histogram", name
    for (name, labels), _ in parse_samples(text).items():
        if name.startswith("tokenmill_") and name != "tokenmill_http_requests_total":
            assert ("model_name", "m") in labels, name
    # Every reason is exported from the start, so rates and ratios have a series at 0.
    assert text.count("tokenmill_requests_finished_total{") == len(FINISHED_REASONS)


@pytest.mark.timeout(30)
def test_dashboard_uses_only_exported_metrics(metrics: ServerMetrics) -> None:
    exported = {name for name, _ in samples_of(metrics)}
    metrics.count_http("/x", 200, 0.1)
    exported |= {name for name, _ in samples_of(metrics)}
    used = set(re.findall(r"tokenmill_\w+", DASHBOARD.read_text()))
    assert used and used <= exported, used - exported


@pytest.mark.timeout(60)
def test_stat_listener_is_cheap(metrics: ServerMetrics) -> None:
    """A step with 4 finished requests costs well under a millisecond (steps take >= ms)."""
    done = [finished_output(str(i), 50, [20]) for i in range(4)]
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        metrics.stat_listener(stats(num_preemptions_total=i, prefix_cache_queries_total=i), done)
    per_call = (time.perf_counter() - t0) / n
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per stat_listener call"


def _app(metrics: ServerMetrics) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        return {"id": model_id}

    @app.get("/teapot")
    async def teapot() -> dict:
        raise HTTPException(status_code=418)

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    @app.middleware("http")
    async def deny_secret(request, call_next):  # answers before routing, like the API key check
        if request.url.path.startswith("/secret"):
            return JSONResponse({"error": "no"}, status_code=401)
        return await call_next(request)

    metrics.add_route(app)
    # last: outermost, as in server/middleware.py
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, routes=app.router.routes)

    @app.get("/secret/{name}")
    async def secret(name: str) -> dict:
        return {"name": name}

    return app


@pytest.mark.timeout(60)
def test_http_middleware_counts_by_route_template(metrics: ServerMetrics) -> None:
    client = TestClient(_app(metrics), raise_server_exceptions=False)
    for i in range(3):
        assert client.get(f"/v1/models/m{i}").status_code == 200
    assert client.get("/teapot").status_code == 418
    assert client.get("/boom").status_code == 500
    assert client.get("/random/scan/1").status_code == 404
    assert client.get("/random/scan/2").status_code == 404
    assert client.get("/secret/x").status_code == 401
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = parse_samples(r.text)
    http = {
        (dict(ls)["route"], dict(ls)["status"]): v
        for (n, ls), v in s.items()
        if n == "tokenmill_http_requests_total"
    }
    expected = {
        ("/v1/models/{model_id}", "200"): 3,
        ("/teapot", "418"): 1,
        ("/boom", "500"): 1,
        ("<unmatched>", "404"): 2,
        ("/secret/{name}", "401"): 1,
    }
    assert http == expected
    durations = {
        (dict(ls)["route"], dict(ls)["status"]): v
        for (n, ls), v in s.items()
        if n == "tokenmill_http_request_duration_seconds_count"
    }
    assert durations == expected
    assert value(s, "tokenmill_http_request_duration_seconds_sum") > 0
    om = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


@pytest.mark.timeout(60)
def test_promtool_accepts_exposition(metrics: ServerMetrics) -> None:
    promtool = require_tool("promtool")
    metrics.stat_listener(stats(), [finished_output("a", 10, [5], "stop")])
    metrics.count_http("/v1/completions", 200)
    body, _ = metrics.render(None)
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


# --- a real server under a scripted load ----------------------------------------------------


def _idle(url: str) -> dict | None:
    s = scrape(url)
    idle = (
        value(s, "tokenmill_num_requests_running") == 0
        and value(s, "tokenmill_num_requests_waiting") == 0
    )
    return s if idle else None


@pytest.mark.timeout(200)
def test_live_metrics_move_with_load(tokenmill_server) -> None:
    url = tokenmill_server.url
    before = wait_until(lambda: _idle(url), 30, "an idle server")
    idle_usage = value(before, "tokenmill_kv_cache_usage_ratio")
    total_blocks = value(before, "tokenmill_kv_cache_total_blocks")
    assert total_blocks > 0, "gauges unset before the first step: feed stat_listener at startup"
    assert value(before, "tokenmill_kv_cache_free_blocks") == total_blocks

    res: LoadResult = run_load(url)
    after = wait_until(lambda: _idle(url), 30, "running/waiting back to 0")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    n = res.num_requests
    assert delta("tokenmill_prompt_tokens_total") == res.prompt_tokens
    assert delta("tokenmill_generation_tokens_total") == res.completion_tokens
    assert delta("tokenmill_request_prompt_tokens_sum") == res.prompt_tokens
    assert delta("tokenmill_request_generation_tokens_sum") == res.completion_tokens
    for name in (
        "tokenmill_time_to_first_token_seconds_count",
        "tokenmill_e2e_request_latency_seconds_count",
        "tokenmill_request_queue_time_seconds_count",
        "tokenmill_request_prompt_tokens_count",
    ):
        assert delta(name) == n, name
    # One gap per step that gave a request tokens after its first: tokens - 1 for n=1; for
    # n=2 between the longest sample's and both samples' gaps (they may run in other steps).
    gaps = delta("tokenmill_inter_token_latency_seconds_count")
    assert res.min_gaps <= gaps <= res.max_gaps, (gaps, res.min_gaps, res.max_gaps)
    assert delta("tokenmill_time_to_first_token_seconds_sum") > 0
    for reason in FINISHED_REASONS:
        got = delta("tokenmill_requests_finished_total", finished_reason=reason)
        assert got == res.finish_reasons.get(reason, 0), (reason, res.finish_reasons)
    hits, queries = (delta(f"tokenmill_prefix_cache_{k}_total") for k in ("hits", "queries"))
    assert 0 < hits <= queries
    assert delta("tokenmill_num_preemptions_total") > 0, "the small KV cache should preempt"
    steps = delta("tokenmill_step_duration_seconds_count")
    assert steps == delta("tokenmill_step_batch_size_count") > 0
    # a float checkpoint: the torch modules serve every step (ModelRunner.choose_path)
    assert delta("tokenmill_model_steps_total") == steps
    assert delta("tokenmill_model_steps_total", path="torch_float32") == steps
    batched = steps - delta("tokenmill_step_batch_size_bucket", le="1.0")
    assert batched > 0, "no step ran more than one sequence"
    for (route, status), count in res.http.items():
        got = delta("tokenmill_http_requests_total", route=route, status=status)
        assert got == count, (route, status)
        got = delta("tokenmill_http_request_duration_seconds_count", route=route, status=status)
        assert got == count, (route, status)
    # Everything returns to idle: blocks freed (cached prefix blocks count as free).
    assert value(after, "tokenmill_kv_cache_usage_ratio") == idle_usage
    assert value(after, "tokenmill_kv_cache_free_blocks") == total_blocks


@pytest.mark.timeout(60)
def test_live_exposition_passes_promtool(tokenmill_server) -> None:
    promtool = require_tool("promtool")
    r = httpx.get(tokenmill_server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert f'model_name="{MODEL_NAME}"' in r.text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=r.content, capture_output=True, timeout=30
    )
    # NOTE: vLLM's own gauge names (vllm:num_requests_running, ...) are what the Gateway API
    # Inference Extension and KEDA scrape; promtool's linter reserves ':' for recording rules and
    # says so about them, and only about them
    problems = [
        ln
        for ln in (check.stdout + check.stderr).decode().splitlines()
        if ln.strip() and not re.match(r"^vllm:\w+ metric names should not contain ':'$", ln)
    ]
    assert problems == [], problems
    assert "vllm:kv_cache_usage_perc" in r.text
