"""Real servers for end-to-end tests: `python -m server serve ...` in a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from e2e_helpers import KEYED_KEY, TINY_ARGS

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """One `tokenmill serve` subprocess; its stdout+stderr go to a log file."""

    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def children(self) -> list[int]:
        """Pids whose parent is the server (TP workers, helpers)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def launch(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    model: str | None = None,
    attempts: int = 3,
) -> ServerProcess:
    """Start a server and poll /health until it answers 200 (bounded), or fail with its log.

    NOTE: free_port() closes the port before the server binds it, and a TP server's gloo groups
    bind ephemeral ports of their own meanwhile: a lost race ("address already in use") is
    retried on another port, any other start-up failure fails the test.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve"] + ([model] if model else [])
    cmd += [*args, "--host", "127.0.0.1", "--port", str(port)]
    full_env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"}
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            if attempts > 1 and "address already in use" in server.log():
                return launch(args, log_path, env, model, attempts - 1)
            pytest.fail(
                f"server exited with {proc.returncode} during start-up:\n{server.log()[-4000:]}"
            )
        if server.healthy():
            return server
        time.sleep(0.2)  # poll interval, not synchronisation: the loop is bounded by the deadline
    server.stop(5)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="session")
def launch_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: launch_server(args, env=None, model=None); every server is stopped at the end."""
    started: list[ServerProcess] = []

    def make(args: list[str], env: dict[str, str] | None = None, model: str | None = None):
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = launch(args, log, env, model)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def tiny_server(launch_server, tiny_model: str) -> ServerProcess:
    """The shared server (auth off) for most e2e tests."""
    return launch_server(TINY_ARGS, model=tiny_model)


@pytest.fixture(scope="session")
def keyed_server(launch_server, tiny_model: str) -> ServerProcess:
    """A shared server with an API key (KEYED_KEY): the Anthropic and Responses API tests."""
    return launch_server(TINY_ARGS, env={"TOKENMILL_API_KEY": KEYED_KEY}, model=tiny_model)


@pytest.fixture(scope="session")
def default_server(launch_server, smollm2_gguf: str) -> ServerProcess:
    """`tokenmill serve` with no MODEL (the embedded SmolLM2), started once for every module."""
    return launch_server(["--log-level", "info"])


@pytest.fixture
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)  # fmt: skip


@pytest.fixture
def aclient(tiny_server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=120
    )
