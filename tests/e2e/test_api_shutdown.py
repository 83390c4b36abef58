"""SIGTERM: stop accepting, let in-flight streams finish (or abort after the timeout), exit 0."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import TINY_ARGS, engine_stats, wait_for


def _stream_in_thread(url: str, result: dict) -> threading.Thread:
    def run() -> None:
        body = {"prompt": "Tell me everything", "max_tokens": 480, "ignore_eos": True,
                "stream": True, "temperature": 0}  # fmt: skip
        lines = []
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
                lines.extend(line for line in resp.iter_lines() if line)
        except httpx.HTTPError as e:
            result["error"] = e
        result["lines"] = lines

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _sigterm_and_wait(server, timeout: float) -> tuple[int, float, list[int]]:
    children = server.children()
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        pytest.fail(f"server still running {timeout} s after SIGTERM:\n{server.log()[-3000:]}")
    return rc, time.monotonic() - t0, children


@pytest.mark.timeout(120)
def test_sigterm_finishes_in_flight_stream_and_exits_0(launch_server, tiny_model: str) -> None:
    server = launch_server([*TINY_ARGS, "--shutdown-timeout", "30"], model=tiny_model)
    result: dict = {}
    t = _stream_in_thread(server.url, result)
    wait_for(lambda: engine_stats(server.url)["num_running"] == 1, 30, "the stream to start")
    rc, _, children = _sigterm_and_wait(server, 60)
    t.join(30)
    assert rc == 0, server.log()[-3000:]
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in result["lines"][-2]  # it ran to its end
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
    assert "tokenmill: serving" in server.log()


@pytest.mark.timeout(120)
def test_sigterm_aborts_streams_after_the_timeout(launch_server, tiny_model: str) -> None:
    """8 x 480 tokens through one sequence slot cannot finish within a 0.2 s shutdown timeout
    (that would take > 19,000 tokens/s): what is left is aborted, and nothing hangs."""
    args = [*TINY_ARGS, "--max-num-seqs", "1", "--shutdown-timeout", "0.2"]
    server = launch_server(args, model=tiny_model)
    results: list[dict] = [{} for _ in range(8)]
    threads = [_stream_in_thread(server.url, r) for r in results]
    wait_for(
        lambda: (s := engine_stats(server.url))["num_running"] + s["num_waiting"] == 8,
        30,
        "all 8 streams to arrive",
    )
    rc, took, children = _sigterm_and_wait(server, 30)
    for t in threads:
        t.join(30)
    assert rc == 0, server.log()[-3000:]
    assert took < 15
    # cut short: at most the stream in the one slot can have reached its finish_reason "length"
    ran_to_length = [
        r for r in results if any('"finish_reason":"length"' in line for line in r["lines"])
    ]
    assert len(ran_to_length) <= 1, f"{len(ran_to_length)} of 8 streams ran to their end"
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
