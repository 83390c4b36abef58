"""benchmarks/soak.py for 30 s against a real server: nothing lost, no 5xx, no leaks.

Before the traffic the soak writes the whole KV pool once (its pages become resident when first
written), so the RSS baseline holds everything the server is configured to use and the 30 s can
be measured from the first request.

NOTE: the tiny checkpoint is float32, whose CPU matmuls go to oneDNN: oneDNN's primitive cache
and ideep's computation cache keep up to 1,024 entries each, one per distinct row count, and
with the soak's variety of batch shapes they grow RSS for minutes (measured: 480 -> ~1,100 MiB,
then flat) while being bounded. The server runs with both capped at 8 (flat at 480 MiB, same
request rate), so 30 s can tell a leak from a cache filling. The default GGUF model's packed
weights never reach oneDNN; its 30-minute run is in benchmarks/README.md.
"""

from __future__ import annotations

import json

import pytest
from e2e_helpers import TINY_ARGS

from benchmarks.soak import run_soak

SOAK_S = 30.0
ENV = {"OMP_NUM_THREADS": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8", "LRU_CACHE_CAPACITY": "8"}


@pytest.mark.timeout(300)
def test_soak_accounts_for_every_request(launch_server, tiny_model: str) -> None:
    # 8 MiB of KV (1,024 blocks), half of TINY_ARGS': the fill before the traffic takes half as long
    args = [*TINY_ARGS, "--max-n", "4", "--kv-cache-memory", "8MiB"]
    server = launch_server(args, env=ENV, model=tiny_model)
    report = run_soak(server.url, SOAK_S, concurrency=6, seed=1, max_n=4, warmup_s=0.0,
                      rss_every_s=5.0)  # fmt: skip
    summary = report.summary()
    assert not report.problems, json.dumps(summary, indent=1)
    assert report.kv_fill_tokens >= 1024 * 16, summary
    assert sum(report.sent.values()) > 50 and sum(report.vanished.values()) > 0, summary
    assert {s for (_, s) in report.seen} >= {200, 400}, summary
    assert report.rss_start > 0 and len(report.rss_trace) >= 4, summary
    assert server.healthy()
