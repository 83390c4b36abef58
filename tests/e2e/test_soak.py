"""benchmarks/soak.py for 60 s against a real server: nothing lost, no 5xx, no leaks."""

from __future__ import annotations

import json

import pytest
from e2e_helpers import TINY_ARGS

from benchmarks.soak import run_soak

SOAK_S = 60.0


@pytest.mark.timeout(300)
def test_soak_accounts_for_every_request(launch_server, tiny_model: str) -> None:
    server = launch_server([*TINY_ARGS, "--max-n", "4"], env={"OMP_NUM_THREADS": "1"},
                           model=tiny_model)  # fmt: skip
    report = run_soak(server.url, SOAK_S, concurrency=6, seed=1, max_n=4, warmup_s=15.0)
    summary = report.summary()
    assert not report.problems, json.dumps(summary, indent=1)
    assert sum(report.sent.values()) > 50 and sum(report.vanished.values()) > 0, summary
    assert {s for (_, s) in report.seen} >= {200, 400}, summary
    assert server.healthy()
