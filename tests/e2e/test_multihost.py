"""Two "hosts" on 127.0.0.1: `tokenmill serve --node-rank 0` and `tokenmill worker --node-rank 1`,
separate process trees started by separate commands. TP=2 (1 rank a host) and TP=4 (2 a host)
match TP=1 token for token; a lost host, a host that never joins and mismatched flags fail
clearly; a node without the cluster secret is refused while the head serves on; nothing is left
running after either side is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from e2e_helpers import TINY_ARGS, TINY_NAME, stream_then_kill

from tests.e2e.conftest import free_port

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]

PROMPTS = ("Hello, my name is", "The capital of France is")
SECRET = "s3cret-shared-by-the-hosts"


@dataclass
class Node:
    """One `tokenmill` command (serve or worker) and the log it writes."""

    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{self.log()[-3000:]}")


def start(
    command: str, model: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> Node:
    cmd = [sys.executable, "-m", "server", command, model, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})  # fmt: skip
    return Node(proc, log_path)


def cluster_args(
    tp: int, port: int, node_rank: int, *extra: str, secret: str | None = SECRET
) -> list[str]:
    return [
        *TINY_ARGS, "-tp", str(tp), "--nnodes", "2", "--node-rank", str(node_rank),
        "--master-addr", "127.0.0.1", "--master-port", str(port), "--device", "cpu",
        *(["--cluster-secret", secret] if secret else []), *extra,
    ]  # fmt: skip


@dataclass
class Cluster:
    head: Any  # conftest's ServerProcess
    worker: Node
    port: int  # the head's rendezvous port

    def trees(self) -> list[psutil.Process]:
        return [*Node(self.head.proc, self.head.log_path).tree(), *self.worker.tree()]


def two_hosts(tmp: Path, launch_server, model: str, tp: int) -> Cluster:
    """The worker host first (it waits for the head), then the head, healthy once all joined."""
    port = free_port()
    worker = start("worker", model, cluster_args(tp, port, 1), tmp / "worker.log")
    try:
        head = launch_server(cluster_args(tp, port, 0), model=model)
    except BaseException:
        worker.proc.kill()
        print(worker.log()[-3000:])
        raise
    return Cluster(head, worker, port)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, launch_server, tiny_model):
    cluster = two_hosts(tmp_path_factory.mktemp("tp2"), launch_server, tiny_model, 2)
    yield cluster
    cluster.worker.proc.kill()


@pytest.fixture(scope="module")
def tp4(tmp_path_factory, launch_server, tiny_model):
    cluster = two_hosts(tmp_path_factory.mktemp("tp4"), launch_server, tiny_model, 4)
    yield cluster
    cluster.worker.proc.kill()


def completion(url: str, prompt: str) -> dict:
    body = {"model": TINY_NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
            "logprobs": 2}  # fmt: skip
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def assert_same_as_tp1(url: str, tp1_url: str) -> None:
    """Greedy tokens identical; logprobs equal up to float32 summation order."""
    for prompt in PROMPTS:
        got, want = completion(url, prompt), completion(tp1_url, prompt)
        assert got["text"] == want["text"]
        assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
        for a, b in zip(got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"],
                        strict=True):  # fmt: skip
            assert a == pytest.approx(b, abs=1e-4)
        for a, b in zip(got["logprobs"]["top_logprobs"], want["logprobs"]["top_logprobs"],
                        strict=True):  # fmt: skip
            assert list(a) == list(b)


def assert_gone(procs: list[psutil.Process]) -> None:
    gone, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def ranks(node: Node) -> list[psutil.Process]:
    """A node's rank processes (less multiprocessing's resource tracker)."""
    return [p for p in node.tree() if "resource_tracker" not in " ".join(p.cmdline())]


def test_tp2_across_two_hosts_matches_tp1(tp2, tiny_server):
    assert len(ranks(tp2.worker)) == 1
    assert_same_as_tp1(tp2.head.url, tiny_server.url)


def test_wrong_or_missing_secret_is_refused_and_the_head_serves_on(
    tp2, tiny_server, tiny_model, tmp_path
):
    """A node with the wrong secret (from the environment) is refused with a clear error, one
    with none stops before connecting; the head logs the refusal (never a secret) and serves."""
    env = {"TOKENMILL_CLUSTER_SECRET": "not-the-secret"}
    intruder = start("worker", tiny_model, cluster_args(2, tp2.port, 1, secret=None),
                     tmp_path / "wrong.log", env)  # fmt: skip
    assert intruder.wait(120) == 1, intruder.log()[-3000:]
    want = f"the head at 127.0.0.1:{tp2.port} refused this node: wrong or missing cluster secret"
    assert want in intruder.log(), intruder.log()[-3000:]
    none = start("worker", tiny_model, cluster_args(2, tp2.port, 1, secret=None),
                 tmp_path / "none.log", {"TOKENMILL_CLUSTER_SECRET": ""})  # fmt: skip
    assert none.wait(120) == 1
    assert "nnodes 2 needs a shared secret that every host proves on joining" in none.log()
    log = tp2.head.log()
    assert "refused a node joining 127.0.0.1" in log and "wrong or missing cluster secret" in log
    assert SECRET not in log and "not-the-secret" not in log
    assert httpx.get(f"{tp2.head.url}/health", timeout=10).status_code == 200
    assert_same_as_tp1(tp2.head.url, tiny_server.url)


def test_lost_host_fails_requests_health_and_exits(tp2):
    """The worker host's whole tree dies mid-stream: the stream ends with an error naming rank
    1, /health says 503 with it, the head exits non-zero and leaves nothing behind."""
    procs = tp2.trees()
    events = stream_then_kill(tp2.head.url, tp2.worker.tree())
    errors = [json.loads(e[6:])["error"] for e in events if '"error"' in e]
    assert errors and "rank 1 on node 1 lost" in errors[-1]["message"], events[-3:]
    health = httpx.get(f"{tp2.head.url}/health", timeout=10)
    assert health.status_code == 503 and "rank 1 on node 1 lost" in health.text, health.text
    assert tp2.head.proc.wait(60) == 1, tp2.head.log()[-3000:]
    log = tp2.head.log()
    assert "exiting: the engine failed" in log and "tensor-parallel rank 1 on node 1 lost" in log
    assert_gone(procs)


def test_tp4_two_ranks_a_host_matches_tp1(tp4, tiny_server):
    assert len(ranks(tp4.worker)) == 2  # the worker command is rank 2 and spawned rank 3
    assert_same_as_tp1(tp4.head.url, tiny_server.url)


def test_lost_head_ends_every_worker(tp4):
    """The head crashes (SIGKILL): its own spawned rank and the worker host's ranks all exit,
    the worker command non-zero, naming the head."""
    procs = tp4.trees()
    tp4.head.proc.kill()
    assert tp4.worker.wait(60) == 1
    assert "the head at 127.0.0.1" in tp4.worker.log() and "lost" in tp4.worker.log()
    assert_gone(procs)


def test_host_that_never_joins_is_named(tmp_path, tiny_model):
    head = start("serve", tiny_model,
                 [*cluster_args(4, free_port(), 0, "--distributed-timeout", "2"), "--port",
                  str(free_port())], tmp_path / "head.log")  # fmt: skip
    procs = head.tree()
    assert head.wait(120) == 1
    log = head.log()
    assert "tensor-parallel ranks [2, 3] (nodes [1]) did not join 127.0.0.1" in log, log[-3000:]
    assert "within 2 s" in log and "--node-rank 1" in log
    assert_gone(procs)


def test_mismatched_flags_fail_on_both_hosts(tmp_path, tiny_model):
    port = free_port()
    worker = start("worker", tiny_model, cluster_args(2, port, 1, "--block-size", "32"),
                   tmp_path / "worker.log")  # fmt: skip
    head = start("serve", tiny_model, [*cluster_args(2, port, 0), "--port", str(free_port())],
                 tmp_path / "head.log")  # fmt: skip
    assert head.wait(120) == 1 and worker.wait(60) == 1
    want = "hosts disagree on the model or flags (theirs vs the head's): rank 1 (node 1): "
    want += "block_size '32' vs '16'"
    assert want in head.log(), head.log()[-3000:]
    assert want in worker.log(), worker.log()[-3000:]
