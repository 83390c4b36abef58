"""Bad input on a real server: OpenAI error envelope, the right status, never a 500 or a hang."""

from __future__ import annotations

import threading

import httpx
import pytest
from e2e_helpers import TINY_MAX_MODEL_LEN, assert_error, engine_stats, wait_for

pytestmark = pytest.mark.timeout(60)

CHAT = [{"role": "user", "content": "hi"}]

# (path, body, status, param): every case is sent as JSON to a healthy server
BAD = [
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.01}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.1}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "tools": [{"type": "function"}]}, 400, "tools"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "response_format": {"type": "xml"}},
        400,
        "response_format",
    ),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),  # out-of-vocabulary token id
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [-5]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),  # fmt: skip
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "logprobs": True, "top_logprobs": 99},
        400,
        "top_logprobs",
    ),  # fmt: skip
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -1}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"messages": CHAT, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),  # fmt: skip
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_request(tiny_server, path: str, body: dict, status: int, param: str) -> None:
    resp = httpx.post(f"{tiny_server.url}{path}", json=body, timeout=30)
    err = assert_error(resp, status, param)
    assert err["type"] == "invalid_request_error"
    assert tiny_server.healthy()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_invalid_json(tiny_server, path: str) -> None:
    for raw in (b"{not json", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe"):
        resp = httpx.post(
            f"{tiny_server.url}{path}",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert_error(resp, 400)
    # no content-type at all (curl -d): still a 400, not a 422 or 500
    assert_error(httpx.post(f"{tiny_server.url}{path}", content=b"prompt=x", timeout=30), 400)
    assert tiny_server.healthy()


def test_prompt_too_long_names_both_numbers(tiny_server) -> None:
    url = tiny_server.url
    ids = [100] * (TINY_MAX_MODEL_LEN - 10)
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 20}, timeout=30)
    msg = assert_error(resp, 400, "max_tokens")["message"]
    assert str(len(ids)) in msg and "20" in msg and str(TINY_MAX_MODEL_LEN) in msg
    too_long = TINY_MAX_MODEL_LEN + 100
    resp = httpx.post(f"{url}/v1/completions", json={"prompt": [100] * too_long}, timeout=30)
    msg = assert_error(resp, 400, "prompt")["message"]
    assert str(too_long) in msg and str(TINY_MAX_MODEL_LEN) in msg
    long_chat = [{"role": "user", "content": "hello " * too_long}]
    resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": long_chat}, timeout=30)
    assert_error(resp, 400, "messages")
    # stream=true fails the same way, before any event is sent
    resp = httpx.post(
        f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 20, "stream": True}, timeout=30
    )
    assert_error(resp, 400, "max_tokens")
    assert tiny_server.healthy()


def test_errors_do_not_disturb_a_running_stream(tiny_server) -> None:
    """A long stream keeps going and finishes normally while bad requests hit the server."""
    url = tiny_server.url
    result: dict = {}

    def stream() -> None:
        body = {"prompt": "steady", "max_tokens": 1000, "ignore_eos": True, "stream": True,
                "temperature": 0}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
        result["lines"] = lines

    t = threading.Thread(target=stream)
    t.start()
    wait_for(lambda: engine_stats(url)["num_running"] >= 1, 30, "the stream to start")
    for path, body, status, param in BAD[:10]:
        assert_error(httpx.post(f"{url}{path}", json=body, timeout=30), status, param)
    assert engine_stats(url)["num_running"] >= 1  # the errors came while it was streaming
    t.join(60)
    assert not t.is_alive()
    assert result["lines"][-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in result["lines"][-2]
