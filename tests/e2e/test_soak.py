"""benchmarks/soak.py for 60 s against a real server: nothing lost, no 5xx, no leaks.

A 60 s soak first warms the server up (audited too): torch's and the kernels' native caches grow
RSS with the variety of batch shapes for the first minute or so (measured: ~430 -> ~1,100 MiB,
then flat: +0.2% over the next 60 s), which is growth to a plateau, not a leak.
"""

from __future__ import annotations

import json

import pytest
from e2e_helpers import TINY_ARGS

from benchmarks.soak import run_soak

SOAK_S = 60.0
WARMUP_S = 60.0


@pytest.mark.timeout(420)
def test_soak_accounts_for_every_request(launch_server, tiny_model: str) -> None:
    server = launch_server([*TINY_ARGS, "--max-n", "4"], env={"OMP_NUM_THREADS": "1"},
                           model=tiny_model)  # fmt: skip
    warm = run_soak(server.url, WARMUP_S, concurrency=6, seed=2, max_n=4, warmup_s=WARMUP_S)
    assert not warm.problems, json.dumps(warm.summary(), indent=1)
    report = run_soak(server.url, SOAK_S, concurrency=6, seed=1, max_n=4, warmup_s=0.0)
    summary = report.summary()
    assert not report.problems, json.dumps(summary, indent=1)
    assert sum(report.sent.values()) > 50 and sum(report.vanished.values()) > 0, summary
    assert {s for (_, s) in report.seen} >= {200, 400}, summary
    assert server.healthy()
