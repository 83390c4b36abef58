"""Helpers for e2e tests: engine stats through GET /stats, bounded polling, error envelopes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

TINY_NAME = "tiny"
KEYED_KEY = "sk-keyed-test"  # keyed_server's API key
TINY_MAX_MODEL_LEN = 4096
# tiny model: 2 layers x 2 KV heads x 16 dims x (K, V) x 4 bytes = 512 B per token → 32k tokens
TINY_ARGS = [
    "--served-model-name", TINY_NAME, "--max-model-len", str(TINY_MAX_MODEL_LEN),
    "--kv-cache-memory", "16MiB", "--max-num-seqs", "64", "--log-level", "warning",
]  # fmt: skip


def engine_stats(url: str, api_key: str | None = None) -> dict:
    """GET /stats: the engine's SchedulerStats plus finished_total by finish_reason."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{url}/stats", headers=headers, timeout=10)
    resp.raise_for_status()
    return resp.json()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def assert_error(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    """The response is OpenAI's error envelope with `status` (and `param` unless "any")."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    return err


def without_cached(usage: dict, block_size: int = 16) -> dict:
    """`usage` minus prompt_tokens_details, after checking its cached_tokens: whole KV blocks,
    fewer than the prompt (the last prompt token is always computed)."""
    usage = dict(usage)
    details = usage.pop("prompt_tokens_details")
    assert set(details) == {"cached_tokens"}, details
    cached = details["cached_tokens"]
    assert cached % block_size == 0 and 0 <= cached < usage["prompt_tokens"], usage
    return usage


def stream_then_kill(url: str, victim: list[Any]) -> list[str]:
    """A long greedy stream; once it has a token, SIGKILL `victim`; read the stream to its end."""
    body = {"model": TINY_NAME, "prompt": "Once upon a time", "max_tokens": 4000,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    events: list[str] = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                events.append(line)
                break
        for p in victim:
            p.kill()
        events += [line for line in lines if line.startswith("data: ")]  # ends, never hangs
    return events
