"""Grammars compile off the event loop: while 24 requests with 24 different JSON schemas (the
server's first constrained requests: llguidance's tokenizer is built among them) arrive at once,
/health keeps answering (p99 < 100 ms), and every request is served."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx
import pytest
from e2e_helpers import TINY_ARGS, TINY_NAME

pytestmark = pytest.mark.timeout(240)

PROBE_EVERY_S = 0.01  # open loop: a stall delays every probe due during it, not only one
MIN_PROBES = 50  # a load that ends sooner is probed on to here: a 30 ms stall still tops p99


def schema(i: int) -> dict:
    return {
        "type": "object",
        "properties": {f"field_{i}": {"type": "integer"}, "name": {"enum": [f"n{i}", "other"]}},
        "required": [f"field_{i}", "name"],
        "additionalProperties": False,
    }


class Probe(threading.Thread):
    """GET /health every PROBE_EVERY_S on a loop of its own; each latency is counted from when
    the probe was due, so a stalled server delays every probe that falls in the stall."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.statuses = url, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            tasks, due = [], time.perf_counter()
            while not (self.stop.is_set() and len(tasks) >= MIN_PROBES):
                tasks.append(asyncio.ensure_future(self._one(client, due)))
                due += PROBE_EVERY_S
                await asyncio.sleep(max(0.0, due - time.perf_counter()))  # NOTE: pacing
            await asyncio.gather(*tasks)

    async def _one(self, client: httpx.AsyncClient, due: float) -> None:
        resp = await client.get(f"{self.url}/health")
        self.latencies.append(time.perf_counter() - due)
        self.statuses.append(resp.status_code)


async def ask(client: httpx.AsyncClient, url: str, i: int) -> httpx.Response:
    body = {"model": TINY_NAME, "prompt": f"Record {i}:", "max_tokens": 6, "temperature": 0.0,
            "guided_json": schema(i)}  # fmt: skip
    return await client.post(f"{url}/v1/completions", json=body)


def test_health_stays_fast_while_24_new_schemas_compile(launch_server, tiny_model) -> None:
    server = launch_server(TINY_ARGS, model=tiny_model)
    probe = Probe(server.url)
    probe.start()

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(ask(client, server.url, i) for i in range(24)))

    try:
        replies = asyncio.run(all_at_once())
    finally:
        probe.stop.set()
        probe.join(60)
    assert [r.status_code for r in replies] == [200] * 24, [r.text for r in replies][:3]
    assert set(probe.statuses) == {200} and len(probe.latencies) >= MIN_PROBES
    p99 = statistics.quantiles(probe.latencies, n=100)[98]
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms (max {max(probe.latencies) * 1000:.0f})"
