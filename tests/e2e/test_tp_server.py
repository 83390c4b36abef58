"""`tokenmill serve --tensor-parallel-size 2`: same completion as TP=1; a killed worker ends the
request in flight with an error and the server exits non-zero; SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import psutil
import pytest
from e2e_helpers import TINY_ARGS, TINY_NAME, stream_then_kill

pytestmark = pytest.mark.timeout(240)


def completion(url: str, prompt: str) -> dict:
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0.0}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def tree(pid: int) -> list[psutil.Process]:
    """The server and every descendant (TP workers, multiprocessing's resource tracker)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_tp2_server_matches_tp1_then_survives_nothing(tiny_server, launch_server, tiny_model):
    server = launch_server([*TINY_ARGS, "--tensor-parallel-size", "2"], model=tiny_model)
    procs = tree(server.proc.pid)
    workers = [p for p in procs[1:] if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in procs]
    for prompt in ("Hello, my name is", "The capital of France is"):
        assert completion(server.url, prompt) == completion(tiny_server.url, prompt)

    events = stream_then_kill(server.url, [workers[0]])  # SIGKILL once a token has streamed
    errors = [json.loads(e[6:])["error"] for e in events if '"error"' in e]
    assert errors and "rank 1" in errors[-1]["message"], events[-3:]
    assert errors[-1]["type"] == "server_error"

    # the engine cannot serve again: the process drains and exits non-zero (a supervisor restarts)
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running after its worker died:\n{server.log()[-3000:]}")
    assert code not in (0, None), code
    log = server.log()
    assert (
        f"tensor-parallel worker rank 1 (pid {workers[0].pid}) died: exit code -9 (SIGKILL)" in log
    )
    assert "exiting: the engine failed" in log and "rank 1" in log
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, [p.pid for p in alive]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "crash"])
def test_tp2_server_exit_takes_every_worker(launch_server, tiny_model, sig):
    """Ctrl-C stops gracefully (exit 0); a crashed (SIGKILLed) server leaves no worker behind."""
    server = launch_server([*TINY_ARGS, "--tensor-parallel-size", "2"], model=tiny_model)
    procs = tree(server.proc.pid)
    assert len(procs) >= 2
    server.proc.send_signal(sig)
    code = server.proc.wait(30)
    assert code == (0 if sig == signal.SIGINT else -signal.SIGKILL), server.log()[-3000:]
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
