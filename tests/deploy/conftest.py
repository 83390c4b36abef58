"""Fixtures for tests/deploy: a real tokenmill server and a real Prometheus scraping it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.deploy.deploy_helpers import (
    KV_CACHE_MEMORY,
    MAX_MODEL_LEN,
    MODEL_NAME,
    REPO,
    VLLM_RULES,
    Proc,
    free_port,
    in_ci,
    require_tool,
    wait_until,
)


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def tokenmill_server(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """`python -m server serve <tiny checkpoint>` on a free port, ready when /health answers 200."""
    if not (REPO / "server" / "cli.py").exists():
        if in_ci():
            pytest.fail("server/cli.py is missing")
        pytest.skip("server/cli.py not written yet")
    ckpt = tiny_checkpoint("llama")
    port = free_port()
    log = tmp_path_factory.mktemp("tokenmill") / "server.log"
    cmd = [
        sys.executable, "-m", "server", "serve", str(ckpt),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", MODEL_NAME,
        "--kv-cache-memory", KV_CACHE_MEMORY,
        "--max-model-len", str(MAX_MODEL_LEN),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_API_KEY"}
    env["OMP_NUM_THREADS"] = "1"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Proc(f"http://127.0.0.1:{port}", port, proc, log)
    try:
        wait_until(lambda: server.check_alive() or _get_ok(server.url + "/health"), 120, "/health")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prometheus(tokenmill_server: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A real Prometheus scraping the test server every second, up once the target is healthy."""
    binary = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(VLLM_RULES)],  # vLLM's names recorded from ours, as deployed
        "scrape_configs": [
            {
                "job_name": "tokenmill",
                "metrics_path": "/metrics",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{tokenmill_server.port}"],
                        # as Kubernetes service discovery attaches (autoscalers select on them)
                        "labels": {
                            "namespace": "default",
                            "pod": "tokenmill-test",
                            "service": "tokenmill",
                        },
                    }
                ],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [
        binary,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    log = tmp / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    prom = Proc(f"http://127.0.0.1:{port}", port, proc, log)

    def target_up() -> bool:
        prom.check_alive()
        try:
            targets = httpx.get(prom.url + "/api/v1/targets", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        active = targets["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    try:
        wait_until(target_up, 60, "Prometheus to scrape tokenmill successfully")
        yield prom
    finally:
        prom.stop()
