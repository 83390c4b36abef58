"""Engine stats and HTTP traffic as Prometheus metrics (GET /metrics), and as vLLM's log line."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

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

if TYPE_CHECKING:
    from fastapi import FastAPI

    from scheduler.outputs import RequestOutput, SchedulerStats

logger = logging.getLogger(__name__)

FINISHED_REASONS = ("stop", "length", "abort", "error")

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

# The gauges the Gateway API Inference Extension and KEDA scrape from each pod, by vLLM's names
# (SchedulerStats field → name, help). NOTE: colons are for recording rules by Prometheus'
# convention (promtool's lint warns), so they are opt-in here and on by default in the server.
VLLM_GAUGES = {
    "num_running": ("vllm:num_requests_running", "Requests in model execution batches (vLLM)."),
    "num_waiting": ("vllm:num_requests_waiting", "Requests waiting to be processed (vLLM)."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent (vLLM)."),
}


class Metric(NamedTuple):
    """One row of METRICS; every metric is labelled model_name, then `labels`."""

    attribute: str  # gauge, total: the SchedulerStats field; others: the ServerMetrics attribute
    name: str
    kind: str  # gauge / total: mirror a SchedulerStats field (total: its running total)
    help: str
    buckets: tuple | None = None  # histograms
    labels: tuple[str, ...] = ()  # after model_name: the attribute is then labels → child


METRICS = (
    Metric("num_running", "tokenmill_num_requests_running", "gauge",
           "Requests in the running batch after the last step."),
    Metric("num_waiting", "tokenmill_num_requests_waiting", "gauge",
           "Requests queued for admission (incl. preempted ones) after the last step."),
    Metric("kv_cache_usage", "tokenmill_kv_cache_usage_ratio", "gauge",
           "Fraction of KV cache blocks in use, 0..1 (cached-but-free prefix blocks are free)."),
    Metric("num_free_blocks", "tokenmill_kv_cache_free_blocks", "gauge",
           "KV cache blocks free (incl. evictable cached ones)."),
    Metric("num_total_blocks", "tokenmill_kv_cache_total_blocks", "gauge",
           "KV cache blocks allocated at startup."),
    Metric("prompt_tokens_total", "tokenmill_prompt_tokens", "total",
           "Prompt tokens, counted once per request when its first token is generated "
           "(as usage.prompt_tokens; vLLM's counting)."),
    Metric("generation_tokens_total", "tokenmill_generation_tokens", "total",
           "Generated tokens, all samples, counted every engine step "
           "(as usage.completion_tokens)."),
    Metric("num_preemptions_total", "tokenmill_num_preemptions", "total",
           "Running requests preempted because KV blocks ran out."),
    Metric("prefix_cache_queries_total", "tokenmill_prefix_cache_queries", "total",
           "Prompt tokens looked up in the prefix cache (tokens, not requests)."),
    Metric("prefix_cache_hits_total", "tokenmill_prefix_cache_hits", "total",
           "Prompt tokens served from the prefix cache (tokens)."),
    Metric("requests_finished", "tokenmill_requests_finished", "counter",
           "Finished requests by finished_reason (stop, length, abort, error).",
           labels=("finished_reason",)),
    Metric("model_steps", "tokenmill_model_steps", "counter",
           "Model steps by the path that served them: graph (CUDA graph), fused (decode.c: a "
           "decode step in one call) or torch (the modules), with the activation dtype "
           "(int8: GGUF blocks x 8-bit activations; float32: the exact path).",
           labels=("path",)),
    Metric("http_requests", "tokenmill_http_requests", "counter",
           "HTTP responses by route template (not raw path) and status code.",
           labels=("route", "status")),
    Metric("http_duration", "tokenmill_http_request_duration_seconds", "histogram",
           "Seconds from request start to the end of the response body (streams included), "
           "by route template and status code.", LATENCY_BUCKETS, ("route", "status")),
    Metric("time_to_first_token", "tokenmill_time_to_first_token_seconds", "histogram",
           "Seconds from arrival to the first generated token, per request.", LATENCY_BUCKETS),
    Metric("inter_token_latency", "tokenmill_inter_token_latency_seconds", "histogram",
           "Seconds between consecutive generated tokens of a request, one observation per gap "
           "(per engine step that gave the request tokens after its first).", ITL_BUCKETS),
    Metric("e2e_latency", "tokenmill_e2e_request_latency_seconds", "histogram",
           "Seconds from arrival to finish, per finished request (any finished_reason).",
           LATENCY_BUCKETS),
    Metric("queue_time", "tokenmill_request_queue_time_seconds", "histogram",
           "Seconds from arrival to first scheduled, per finished request.", LATENCY_BUCKETS),
    Metric("prompt_length", "tokenmill_request_prompt_tokens", "histogram",
           "Prompt length in tokens, per finished request.", TOKEN_BUCKETS),
    Metric("generation_length", "tokenmill_request_generation_tokens", "histogram",
           "Generated tokens per finished request, all samples summed.", TOKEN_BUCKETS),
    Metric("step_duration", "tokenmill_step_duration_seconds", "histogram",
           "Seconds per engine step (schedule + forward + sample + update).", STEP_BUCKETS),
    Metric("step_batch_size", "tokenmill_step_batch_size", "histogram",
           "Sequences in the batch, per engine step.", BATCH_BUCKETS),
    Metric("spec_decode_num_drafts_total", "tokenmill_spec_decode_num_drafts", "total",
           "Verification steps of a sequence with draft tokens (one per sequence and step)."),
    Metric("spec_decode_num_draft_tokens_total", "tokenmill_spec_decode_num_draft_tokens", "total",
           "Draft tokens proposed (speculative decoding)."),
    Metric("spec_decode_num_accepted_tokens_total", "tokenmill_spec_decode_num_accepted_tokens",
           "total", "Draft tokens accepted (equal to the target's own token there)."),
    Metric("acceptance_length", "tokenmill_spec_decode_acceptance_length", "histogram",
           "Tokens a speculating sequence gained in one verification step (1 + accepted "
           "drafts).", ACCEPTANCE_BUCKETS),
)  # fmt: skip
# exported under vLLM's names too, with the vLLM gauges
VLLM_TOTALS = ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
               "spec_decode_num_accepted_tokens_total")  # fmt: skip
KINDS = {"gauge": Gauge, "total": Counter, "counter": Counter, "histogram": Histogram}


class ServerMetrics:
    """Every tokenmill_* metric (METRICS' rows are its attributes), fed by the engine's stat
    listener and by server/middleware.py's HTTPMetricsMiddleware."""

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
        self.gauges: dict[str, Gauge] = {}  # SchedulerStats field → gauge
        self.counters: dict[str, Counter] = {}  # SchedulerStats running total → counter
        vllm = [Metric(f"vllm:{a}", name, "gauge", doc) for a, (name, doc) in VLLM_GAUGES.items()]
        vllm += [
            Metric(f"vllm:{m.attribute}", m.name.replace("tokenmill_", "vllm:"), "total",
                   f"{m.help} (vLLM)")
            for m in METRICS if m.attribute in VLLM_TOTALS
        ]  # fmt: skip
        gauges = [m for m in METRICS if m.kind == "gauge"] + (vllm if vllm_gauges else [])
        for m in gauges + [m for m in METRICS if m.kind != "gauge"]:
            self._register(m)
        for reason in FINISHED_REASONS:  # every reason's series from the start, at 0
            self.requests_finished(reason)
        # The engine reports cumulative totals; counters advance by the difference.
        self._last_totals: dict[str, int] = {}
        self._last_step = 0  # num_steps_total of the last step whose per-step values we observed
        # Per-request tokens of the samples that finished in an earlier delta (n > 1).
        self._sample_tokens: dict[str, dict[int, int]] = {}

    def _register(self, m: Metric) -> None:
        """Create one row's metric in the registry and keep it where the listeners look."""
        kwargs = {"buckets": m.buckets} if m.buckets is not None else {}
        metric = KINDS[m.kind](
            m.name, m.help, ["model_name", *m.labels], registry=self.registry, **kwargs
        )
        if m.labels:
            setattr(self, m.attribute, partial(metric.labels, self.model_name))
            return
        child = metric.labels(self.model_name)
        if m.kind == "gauge":
            self.gauges[m.attribute] = child
        elif m.kind == "total":
            self.counters[m.attribute] = child
        else:
            setattr(self, m.attribute, child)

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
        self.requests_finished(reason).inc()
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
        self.http_requests(route, str(status)).inc()
        if seconds is not None:
            self.http_duration(route, str(status)).observe(seconds)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (text 0.0.4 or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def add_route(self, app: FastAPI) -> None:
        """GET /metrics on `app`; server/middleware.py counts the HTTP traffic."""

        async def metrics(request: Request) -> Response:
            body, content_type = self.render(request.headers.get("accept"))
            return Response(body, media_type=content_type)

        app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


def _request_reason(out: RequestOutput) -> str:
    """One finished_reason per request: the worst of its samples (error > abort > length > stop)."""
    reasons = {c.finish_reason for c in out.outputs}
    return next((r for r in ("error", "abort", "length") if r in reasons), "stop")


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
