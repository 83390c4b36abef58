"""Engine stats and HTTP traffic as Prometheus metrics (GET /metrics), and as vLLM's log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

if TYPE_CHECKING:
    from fastapi import FastAPI

    from scheduler.outputs import RequestOutput, SchedulerStats

logger = logging.getLogger(__name__)

FINISHED_REASONS = ("stop", "length", "abort", "error")
UNMATCHED_ROUTE = "<unmatched>"  # one label value for every path no route matched (404s, scans)

# Buckets in base units that cover a fast GPU (ms) and a busy 2-core CPU (tens of seconds).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ACCEPTANCE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 33)
# speculative decoding counters (SchedulerStats field → the name without _total, help); exported
# under tokenmill_ and, with the vLLM gauges, vLLM's names
SPEC_COUNTERS = {
    "spec_decode_num_drafts_total": (
        "spec_decode_num_drafts",
        "Verification steps of a sequence with draft tokens (one per sequence and step).",
    ),
    "spec_decode_num_draft_tokens_total": (
        "spec_decode_num_draft_tokens",
        "Draft tokens proposed.",
    ),
    "spec_decode_num_accepted_tokens_total": (
        "spec_decode_num_accepted_tokens",
        "Draft tokens accepted (equal to the target's own token there).",
    ),
}

# The gauges the Gateway API Inference Extension and KEDA scrape from each pod, by vLLM's names
# (SchedulerStats field → name, help). NOTE: colons are for recording rules by Prometheus'
# convention (promtool's lint warns), so they are opt-in here and on by default in the server.
VLLM_GAUGES = {
    "num_running": ("vllm:num_requests_running", "Requests in model execution batches (vLLM)."),
    "num_waiting": ("vllm:num_requests_waiting", "Requests waiting to be processed (vLLM)."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent (vLLM)."),
}

ASGIApp = Callable[[MutableMapping[str, Any], Callable, Callable], Awaitable[None]]


class ServerMetrics:
    """Every tokenmill_* metric, fed by the engine's stat listener and by an HTTP middleware."""

    def __init__(
        self, model_name: str, registry: CollectorRegistry | None = None, vllm_gauges: bool = False
    ) -> None:
        """`vllm_gauges`: also export VLLM_GAUGES under vLLM's names (the server's default)."""
        # NOTE: process-wide: the *_created gauges double the series and no dashboard reads them.
        disable_created_metrics()
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.model_name = model_name
        m = {"registry": registry}

        def labelled(cls: type, n: str, doc: str, **kwargs: Any) -> Any:
            return cls(n, doc, ["model_name"], registry=registry, **kwargs).labels(model_name)

        gauge, counter = partial(labelled, Gauge), partial(labelled, Counter)

        def histogram(n: str, doc: str, buckets: tuple) -> Histogram:
            return labelled(Histogram, n, doc, buckets=buckets)

        # Gauges and counters that mirror a SchedulerStats field (counters: its running total).
        self.gauges = {
            "num_running": gauge(
                "tokenmill_num_requests_running",
                "Requests in the running batch after the last step.",
            ),
            "num_waiting": gauge(
                "tokenmill_num_requests_waiting",
                "Requests queued for admission (incl. preempted ones) after the last step.",
            ),
            "kv_cache_usage": gauge(
                "tokenmill_kv_cache_usage_ratio",
                "Fraction of KV cache blocks in use, 0..1 (cached-but-free prefix blocks are "
                "free).",
            ),
            "num_free_blocks": gauge(
                "tokenmill_kv_cache_free_blocks",
                "KV cache blocks free (incl. evictable cached ones).",
            ),
            "num_total_blocks": gauge(
                "tokenmill_kv_cache_total_blocks", "KV cache blocks allocated at startup."
            ),
        }
        if vllm_gauges:
            for attr, (name, doc) in VLLM_GAUGES.items():
                self.gauges[f"vllm:{attr}"] = gauge(name, doc)
        self.counters = {
            "prompt_tokens_total": counter(
                "tokenmill_prompt_tokens",
                "Prompt tokens, counted once per request when its first token is generated "
                "(as usage.prompt_tokens; vLLM's counting).",
            ),
            "generation_tokens_total": counter(
                "tokenmill_generation_tokens",
                "Generated tokens, all samples, counted every engine step "
                "(as usage.completion_tokens).",
            ),
            "num_preemptions_total": counter(
                "tokenmill_num_preemptions",
                "Running requests preempted because KV blocks ran out.",
            ),
            "prefix_cache_queries_total": counter(
                "tokenmill_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache (tokens, not requests).",
            ),
            "prefix_cache_hits_total": counter(
                "tokenmill_prefix_cache_hits",
                "Prompt tokens served from the prefix cache (tokens).",
            ),
        }
        for attr, (name, doc) in SPEC_COUNTERS.items():
            self.counters[attr] = counter(f"tokenmill_{name}", doc)
            if vllm_gauges:
                self.counters[f"vllm:{attr}"] = counter(f"vllm:{name}", f"{doc} (vLLM)")
        finished = Counter(
            "tokenmill_requests_finished",
            "Finished requests by finished_reason (stop, length, abort, error).",
            ["model_name", "finished_reason"],
            **m,
        )
        self.requests_finished = {r: finished.labels(model_name, r) for r in FINISHED_REASONS}
        steps = Counter(
            "tokenmill_model_steps",
            "Model steps by the path that served them: graph (CUDA graph), fused (decode.c: a "
            "decode step in one call) or torch (the modules), with the activation dtype "
            "(int8: GGUF blocks x 8-bit activations; float32: the exact path).",
            ["model_name", "path"],
            **m,
        )
        self.model_steps = partial(steps.labels, model_name)
        self.http_requests = Counter(
            "tokenmill_http_requests",
            "HTTP responses by route template (not raw path) and status code.",
            ["model_name", "route", "status"],
            **m,
        )
        self.http_duration = Histogram(
            "tokenmill_http_request_duration_seconds",
            "Seconds from request start to the end of the response body (streams included), "
            "by route template and status code.",
            ["model_name", "route", "status"],
            buckets=LATENCY_BUCKETS,
            **m,
        )
        self.time_to_first_token = histogram(
            "tokenmill_time_to_first_token_seconds",
            "Seconds from arrival to the first generated token, per request.",
            LATENCY_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "tokenmill_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of a request, one observation per gap "
            "(per engine step that gave the request tokens after its first).",
            ITL_BUCKETS,
        )
        self.e2e_latency = histogram(
            "tokenmill_e2e_request_latency_seconds",
            "Seconds from arrival to finish, per finished request (any finished_reason).",
            LATENCY_BUCKETS,
        )
        self.queue_time = histogram(
            "tokenmill_request_queue_time_seconds",
            "Seconds from arrival to first scheduled, per finished request.",
            LATENCY_BUCKETS,
        )
        self.prompt_length = histogram(
            "tokenmill_request_prompt_tokens", "Prompt length in tokens, per finished request.",
            TOKEN_BUCKETS,
        )  # fmt: skip
        self.generation_length = histogram(
            "tokenmill_request_generation_tokens",
            "Generated tokens per finished request, all samples summed.",
            TOKEN_BUCKETS,
        )
        self.step_duration = histogram(
            "tokenmill_step_duration_seconds",
            "Seconds per engine step (schedule + forward + sample + update).",
            STEP_BUCKETS,
        )
        self.step_batch_size = histogram(
            "tokenmill_step_batch_size", "Sequences in the batch, per engine step.", BATCH_BUCKETS
        )
        self.acceptance_length = histogram(
            "tokenmill_spec_decode_acceptance_length",
            "Tokens a speculating sequence gained in one verification step (1 + accepted drafts).",
            ACCEPTANCE_BUCKETS,
        )
        # The engine reports cumulative totals; counters advance by the difference.
        self._last_totals: dict[str, int] = {}
        self._last_step = 0  # num_steps_total of the last step whose per-step values we observed
        # Per-request tokens of the samples that finished in an earlier delta (n > 1).
        self._sample_tokens: dict[str, dict[int, int]] = {}

    def stat_listener(self, stats: SchedulerStats, finished: list[RequestOutput]) -> None:
        """Called on the engine's step thread after each step; O(finished) and lock-light."""
        for attr, g in self.gauges.items():
            g.set(getattr(stats, attr.removeprefix("vllm:")))
        for attr, c in self.counters.items():
            total, last = getattr(stats, attr.removeprefix("vllm:")), self._last_totals.get(attr, 0)
            if total > last:
                c.inc(total - last)
            self._last_totals[attr] = total
        for path, total in stats.model_steps_total.items():
            last = self._last_totals.get(f"path:{path}", 0)
            if total > last:
                self.model_steps(path).inc(total - last)
            self._last_totals[f"path:{path}"] = total
        if stats.step_num_seqs > 0:
            self.step_duration.observe(stats.step_duration)
            self.step_batch_size.observe(stats.step_num_seqs)
        if stats.num_steps_total != self._last_step:  # a new step (not a repeated snapshot)
            self._last_step = stats.num_steps_total
            for gap in stats.step_inter_token_latencies:
                self.inter_token_latency.observe(gap)
            for n in stats.step_acceptance_lengths:
                self.acceptance_length.observe(n)
        for out in finished:
            self._observe_request(out)

    def _observe_request(self, out: RequestOutput) -> None:
        """Token counters, reason and latency histograms of one request."""
        if not out.finished:
            # A sample of an n > 1 request finished early: remember its tokens for the total.
            done = [(c.index, c.num_tokens) for c in out.outputs if c.finish_reason]
            if done:
                self._sample_tokens.setdefault(out.request_id, {}).update(done)
            return
        samples = self._sample_tokens.pop(out.request_id, {})
        samples.update((c.index, c.num_tokens) for c in out.outputs)
        num_generated = sum(samples.values())
        num_prompt = len(out.prompt_token_ids)
        self.prompt_length.observe(num_prompt)
        self.generation_length.observe(num_generated)
        reason = "error" if out.error else _request_reason(out)
        self.requests_finished[reason].inc()
        m = out.metrics
        if m is None:
            return
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.time_to_first_token.observe(m.first_token_time - m.arrival_time)
        end = m.finished_time if m.finished_time is not None else m.last_token_time
        if end is not None:
            self.e2e_latency.observe(end - m.arrival_time)

    def finished_counts(self) -> dict[str, int]:
        """tokenmill_requests_finished_total by finished_reason, for /stats."""
        name, labels = "tokenmill_requests_finished_total", {"model_name": self.model_name}
        get = self.registry.get_sample_value
        return {r: int(get(name, {**labels, "finished_reason": r}) or 0) for r in FINISHED_REASONS}

    def count_http(self, route: str, status: int, seconds: float | None = None) -> None:
        self.http_requests.labels(self.model_name, route, str(status)).inc()
        if seconds is not None:
            self.http_duration.labels(self.model_name, route, str(status)).observe(seconds)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (text 0.0.4 or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def install(self, app: FastAPI) -> None:
        """Add the HTTP counting middleware and GET /metrics to `app` (before it starts)."""

        async def metrics(request: Request) -> Response:
            body, content_type = self.render(request.headers.get("accept"))
            return Response(body, media_type=content_type)

        app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
        app.add_middleware(HTTPMetricsMiddleware, metrics=self, routes=app.router.routes)


def _request_reason(out: RequestOutput) -> str:
    """One finished_reason per request: the worst of its samples (error > abort > length > stop)."""
    reasons = {c.finish_reason for c in out.outputs}
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


class HTTPMetricsMiddleware:
    """Pure ASGI (streams pass through untouched): counts responses by route template + status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: list | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes if routes is not None else []  # the app's list: later routes too

    def route_template(self, scope: MutableMapping[str, Any]) -> str:
        """The matched route's template; for responses sent before routing (401), match here."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or UNMATCHED_ROUTE

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable, send: Callable):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started is a 500 to the client
        start = time.perf_counter()

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.count_http(self.route_template(scope), status, time.perf_counter() - start)


class StatsLogger:
    """A stat listener: at most one line every `interval_s` seconds, only after steps ran."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last_time = time.monotonic()
        self._last = (0, 0, 0, 0)  # prompt tokens, generated tokens, prefix queries, prefix hits
        self._last_spec = (0, 0, 0)  # drafts, draft tokens, accepted tokens

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
        self._log_spec(stats)

    def _log_spec(self, stats: SchedulerStats) -> None:
        """vLLM's SpecDecoding line, over the interval; none without drafts."""
        totals = (
            stats.spec_decode_num_drafts_total,
            stats.spec_decode_num_draft_tokens_total,
            stats.spec_decode_num_accepted_tokens_total,
        )
        drafts, drafted, accepted = (a - b for a, b in zip(totals, self._last_spec, strict=True))
        self._last_spec = totals
        if drafts:
            logger.info(
                "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted: %d tokens, "
                "Drafted: %d tokens, Avg Draft acceptance rate: %.1f%%",
                1 + accepted / drafts,
                accepted,
                drafted,
                100.0 * accepted / drafted,
            )
