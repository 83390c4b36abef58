"""build_app() in-process over a real AsyncEngine: lifespan, /health 200/503, the 500 envelope."""

from __future__ import annotations

import httpx
import pytest

from scheduler.async_engine import AsyncEngine
from scheduler.config import EngineConfig
from server.app import ServerConfig, build_app


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> AsyncEngine:
    config = EngineConfig(
        model=str(tiny_checkpoint("llama")), served_model_name="tiny", max_model_len=512,
        kv_cache_memory=16 * 2**20,
    )  # fmt: skip
    return AsyncEngine(config)


def client_for(app) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://app")


@pytest.mark.timeout(120)
async def test_lifespan_health_and_catch_all(engine: AsyncEngine) -> None:
    app = build_app(engine, ServerConfig())

    async def boom() -> None:
        raise RuntimeError("a bug, not bad input")

    app.add_api_route("/boom", boom, methods=["GET"])
    async with client_for(app) as client:
        resp = await client.get("/health")  # lifespan not run: the step thread is not started
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_dead"
        resp = await client.get("/boom")
        assert resp.status_code == 500
        assert resp.json()["error"]["type"] == "server_error"
        assert "RuntimeError" in resp.json()["error"]["message"]

        async with app.router.lifespan_context(app):
            assert (await client.get("/health")).status_code == 200
            body = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}
            resp = await client.post("/v1/completions", json=body)
            assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3

        # the server's thread pools are shut down with it: offload and the grammar compiler's
        pools = [app.state.offload._pool, engine.engine.constraints._compile_thread]
        assert all(p._shutdown for p in pools)
        threads = [t for p in pools for t in p._threads]
        assert threads  # each did work (a tokenized prompt; the tokenizer built at start)
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)

        # after shutdown: unhealthy, and new requests get a 503 envelope (not a 500 or a hang)
        assert (await client.get("/health")).status_code == 503
        resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
        schema = {"prompt": "hi", "max_tokens": 3, "guided_json": {"type": "object"}}
        resp = await client.post("/v1/completions", json=schema)  # constrained: a 503 too
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
