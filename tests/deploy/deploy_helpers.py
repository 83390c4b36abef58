"""Helpers for tests/deploy: processes, polling, /metrics parsing and a scripted load."""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"
# A small KV cache so the concurrent load preempts: the tiny model's block of 16 tokens costs
# 2 (K, V) x 2 layers x 16 x 2 KV heads x 16 head_dim x 4 bytes = 8 KiB, so 24 blocks.
KV_CACHE_MEMORY = "192KiB"
MAX_MODEL_LEN = 256
VLLM_RULES = REPO / "deploy" / "prometheus" / "rules" / "vllm-compat.yml"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of a Prometheus binary; skip locally without it, fail in CI (CI installs it)."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} not found on PATH; scripts/install-prometheus.sh installs Debian's prometheus"
    if in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll `check` until it returns a truthy value; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@dataclass
class Proc:
    """A child process with its log file and base URL."""

    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"process exited with {self.proc.returncode}:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    """GET /metrics → {(sample name, labels): value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return parse_samples(text)


def parse_samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return math.fsum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@dataclass
class LoadResult:
    """What the responses of a scripted load reported."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    num_requests: int = 0  # requests the engine ran to completion
    num_multi_token: int = 0  # of those, requests whose longest sample has >= 2 tokens
    min_gaps: int = 0  # inter-token gaps if every request's samples step together
    max_gaps: int = 0  # ... if they never do (one gap per token after each request's first)
    finish_reasons: dict[str, int] = field(default_factory=dict)  # one per request (worst)
    http: dict[tuple[str, str], int] = field(default_factory=dict)  # (route, status) → count

    def add(self, usage: dict, reasons: list[str], longest: int) -> None:
        self.num_requests += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.num_multi_token += longest >= 2
        self.min_gaps += max(longest - 1, 0)
        self.max_gaps += max(usage["completion_tokens"] - 1, 0)
        worst = "length" if "length" in reasons else "stop"
        self.finish_reasons[worst] = self.finish_reasons.get(worst, 0) + 1

    def count_http(self, route: str, status: int) -> None:
        key = (route, str(status))
        self.http[key] = self.http.get(key, 0) + 1


SHARED_PREFIX = " ".join(f"word{i}" for i in range(40))  # > 2 blocks of 16: prefix cache hits


def distinct_prompt(i: int) -> str:
    return f"request {i}: " + " ".join(f"w{i}x{j}" for j in range(10))


async def _completion(
    client: httpx.AsyncClient, res: LoadResult, prompt: str, max_tokens: int, n: int = 1
) -> None:
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "n": n,
        "temperature": 0 if n == 1 else 0.8,
        "ignore_eos": True,
    }
    r = await client.post("/v1/completions", json=body)
    res.count_http("/v1/completions", r.status_code)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["choices"]) == n
    # ignore_eos: every sample runs to max_tokens (unless max_model_len ends it sooner).
    res.add(data["usage"], [c["finish_reason"] for c in data["choices"]], max_tokens)


async def _chat_stream(client: httpx.AsyncClient, res: LoadResult, i: int, max_tokens: int) -> None:
    import json

    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": distinct_prompt(i)}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage, reasons = None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        res.count_http("/v1/chat/completions", r.status_code)
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            usage = chunk.get("usage") or usage
            reasons += [c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")]
    assert usage is not None, "no usage chunk with stream_options.include_usage"
    assert len(reasons) == 1, reasons
    res.add(usage, reasons, usage["completion_tokens"])


async def _load(url: str, concurrency: int, max_tokens: int) -> LoadResult:
    res = LoadResult()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        # Two requests one after the other: the second finds the first's prompt blocks cached.
        await _completion(client, res, SHARED_PREFIX + " first", 4)
        await _completion(client, res, SHARED_PREFIX + " second", 4)
        # Concurrent requests that together need more KV blocks than the pool has: preemption.
        jobs = [
            _completion(client, res, distinct_prompt(i), max_tokens, n=2 if i == 1 else 1)
            if i % 2
            else _chat_stream(client, res, i, max_tokens)
            for i in range(concurrency)
        ]
        await asyncio.gather(*jobs)
        # A request the server rejects (max_tokens past max_model_len) and an unknown path.
        body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": MAX_MODEL_LEN * 4}
        r = await client.post("/v1/completions", json=body)
        res.count_http("/v1/completions", r.status_code)
        assert r.status_code == 400, r.text
        r = await client.get("/no/such/path")
        res.count_http("<unmatched>", r.status_code)
    return res


def run_load(url: str, concurrency: int = 6, max_tokens: int = 48) -> LoadResult:
    """A short mixed load: completions (one n=2) + streaming chats, a shared prefix, preemption."""
    return asyncio.run(_load(url, concurrency, max_tokens))
