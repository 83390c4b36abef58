"""/v1/models, /health, /version, /tokenize, /detokenize, /metrics, /stats on a real server."""

from __future__ import annotations

import httpx
import openai
import pytest
from e2e_helpers import TINY_MAX_MODEL_LEN, TINY_NAME, assert_error, engine_stats

pytestmark = pytest.mark.timeout(60)


def test_models(client: openai.OpenAI, tiny_server, tiny_model: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY_NAME]
    raw = httpx.get(f"{tiny_server.url}/v1/models", timeout=10).json()
    assert raw["object"] == "list"
    card = raw["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "tokenmill"
    assert card["max_model_len"] == TINY_MAX_MODEL_LEN and card["root"] == tiny_model
    assert isinstance(card["created"], int)


def test_health_and_version(tiny_server) -> None:
    assert httpx.get(f"{tiny_server.url}/health", timeout=10).status_code == 200
    version = httpx.get(f"{tiny_server.url}/version", timeout=10).json()["version"]
    assert version.startswith("0.")


def test_tokenize_detokenize_roundtrip(tiny_server) -> None:
    url = tiny_server.url
    text = "Hello, tokenmill!"
    tok = httpx.post(f"{url}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) > 1
    assert tok["max_model_len"] == TINY_MAX_MODEL_LEN
    assert "".join(tok["token_strs"]) == text
    detok = httpx.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok == {"prompt": text}
    # the model field, when given, must name this model
    assert (
        httpx.post(f"{url}/tokenize", json={"model": TINY_NAME, "prompt": "x"}).status_code == 200
    )
    assert_error(
        httpx.post(f"{url}/tokenize", json={"model": "gpt-9", "prompt": "x"}), 404, "model"
    )
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_tokenize_chat_uses_the_template(tiny_server) -> None:
    url = tiny_server.url
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    chat = httpx.post(f"{url}/tokenize", json={"messages": msgs}).json()
    text = httpx.post(f"{url}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    plain = httpx.post(f"{url}/tokenize", json={"prompt": "What is 2+2?"}).json()
    assert "What is 2+2?" in text and chat["count"] > plain["count"]
    no_gen = httpx.post(
        f"{url}/tokenize", json={"messages": msgs, "add_generation_prompt": False}
    ).json()
    assert no_gen["count"] < chat["count"]


def test_metrics_and_stats(client: openai.OpenAI, tiny_server) -> None:
    client.completions.create(model=TINY_NAME, prompt="count me", max_tokens=2)
    text = httpx.get(f"{tiny_server.url}/metrics", timeout=10).text
    assert "tokenmill_" in text and f'model_name="{TINY_NAME}"' in text
    stats = engine_stats(tiny_server.url)
    assert (
        stats["num_total_blocks"] > 0 and 0 <= stats["num_free_blocks"] <= stats["num_total_blocks"]
    )
    assert stats["finished_total"].get("length", 0) >= 1


def test_unknown_route_and_method_use_the_envelope(tiny_server) -> None:
    assert_error(httpx.get(f"{tiny_server.url}/v1/nope", timeout=10), 404)
    assert_error(httpx.get(f"{tiny_server.url}/v1/completions", timeout=10), 405)
