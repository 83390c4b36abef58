"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's API) with the real `anthropic`
SDK against a real server: answers equal the chat endpoint's, events, tools, errors."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import openai
import pytest
from e2e_helpers import KEYED_KEY, TINY_MAX_MODEL_LEN, TINY_NAME

pytestmark = pytest.mark.timeout(120)

SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "ignore_eos": True}  # sampling fields arrive through extra_body
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def claude(keyed_server) -> anthropic.Anthropic:
    """The SDK as users make it: a base URL without /v1, the key as x-api-key."""
    return anthropic.Anthropic(base_url=keyed_server.url, api_key=KEYED_KEY, max_retries=0,
                               timeout=90)  # fmt: skip


def chat_text(url: str, max_tokens: int, messages: list | None = None, **extra) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYED_KEY, max_retries=0, timeout=90)
    messages = [{"role": "system", "content": SYSTEM}, *(messages or MESSAGES)]
    out = client.chat.completions.create(
        model=TINY_NAME, messages=messages, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )  # fmt: skip
    return out.choices[0].message.content


def anthropic_error(resp: httpx.Response, status: int, err_type: str) -> str:
    """The body is Anthropic's error shape with `err_type`; returns its message."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == err_type, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]["message"]


def test_create_equals_chat_and_counts_tokens(claude, keyed_server) -> None:
    msg = claude.messages.create(model=TINY_NAME, max_tokens=6, system=SYSTEM, messages=MESSAGES,
                                 extra_body=GREEDY, metadata={"user_id": "u1"})  # fmt: skip
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.model == TINY_NAME and msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == chat_text(keyed_server.url, 6)
    count = claude.messages.count_tokens(model=TINY_NAME, system=SYSTEM, messages=MESSAGES)
    chat_messages = [{"role": "system", "content": SYSTEM}, *MESSAGES]
    tokenized = httpx.post(f"{keyed_server.url}/tokenize", timeout=30,
                           headers={"Authorization": f"Bearer {KEYED_KEY}"},
                           json={"messages": chat_messages})  # fmt: skip
    assert count.input_tokens == tokenized.json()["count"] > 5
    usage = msg.usage
    assert usage.output_tokens == 6 and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + usage.cache_read_input_tokens == count.input_tokens
    # the same request again reads its prefix from the cache, whole blocks of 16 tokens
    again = claude.messages.create(model=TINY_NAME, max_tokens=6, system=SYSTEM,
                                   messages=MESSAGES, extra_body=GREEDY)  # fmt: skip
    assert again.content == msg.content
    assert again.usage.cache_read_input_tokens == count.input_tokens // 16 * 16
    # the key as a bearer token works too (the SDK's auth_token), any anthropic-version
    bearer = anthropic.Anthropic(base_url=keyed_server.url, auth_token=KEYED_KEY, max_retries=0,
                                 default_headers={"anthropic-version": "1999-01-01"})  # fmt: skip
    counted = bearer.messages.count_tokens(model=TINY_NAME, system=SYSTEM, messages=MESSAGES)
    assert counted.input_tokens == count.input_tokens


def test_stream_events_in_order_and_equal_to_create(claude, keyed_server) -> None:
    kw = dict(model=TINY_NAME, max_tokens=7, system=SYSTEM, messages=MESSAGES, extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert [(b.type, b.text) for b in final.content] == [("text", text)]
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 7
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    )
    # on the wire: every data line has its event line, in Anthropic's order
    body = {"model": TINY_NAME, "max_tokens": 7, "system": SYSTEM, "messages": MESSAGES,
            "stream": True, **GREEDY}  # fmt: skip
    headers = {"x-api-key": KEYED_KEY, "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{keyed_server.url}/v1/messages", json=body, headers=headers,
                      timeout=60) as resp:  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line and not line.startswith(":")]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert all(line.startswith("event: ") for line in lines[0::2])
    assert [d["type"] for d in datas] == names
    n_deltas = len(names) - 6
    assert names == ["message_start", "ping", "content_block_start",
                     *["content_block_delta"] * n_deltas,
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip
    assert n_deltas >= 1
    assert datas[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert datas[-2]["usage"]["output_tokens"] == 7
    num_prompt = whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert datas[0]["message"]["usage"]["input_tokens"] == num_prompt
    end = datas[-2]["usage"]
    assert end["input_tokens"] + end["cache_read_input_tokens"] == num_prompt


def test_a_final_assistant_turn_is_continued(claude, keyed_server) -> None:
    prefill = [*MESSAGES, {"role": "assistant", "content": "The capital is"}]
    msg = claude.messages.create(model=TINY_NAME, max_tokens=5, system=SYSTEM, messages=prefill,
                                 extra_body=GREEDY)  # fmt: skip
    want = chat_text(keyed_server.url, 5, prefill, continue_final_message=True,
                     add_generation_prompt=False)  # fmt: skip
    assert msg.content[0].text == want and msg.usage.output_tokens == 5
    assert msg.content[0].text != chat_text(keyed_server.url, 5)


def test_stop_sequences_name_the_one_that_matched(claude) -> None:
    kw = dict(model=TINY_NAME, system=SYSTEM, messages=MESSAGES, extra_body=GREEDY)
    text = claude.messages.create(max_tokens=12, **kw).content[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    msg = claude.messages.create(max_tokens=12, stop_sequences=["zzzq", stop], **kw)
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    assert msg.content[0].text == text[: text.index(stop)]
    with claude.messages.stream(max_tokens=12, stop_sequences=["zzzq", stop], **kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text[: text.index(stop)]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_forced_tool_use_validates_then_tool_result_round_trip(claude) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=TINY_NAME, max_tokens=64, messages=question, tools=[WEATHER],
              extra_body={"temperature": 0})  # fmt: skip
    # NOTE: one call each: with parallel calls allowed a random model calls until max_tokens
    for choice in ({"type": "tool", "name": "get_weather"},
                   {"type": "any", "disable_parallel_tool_use": True}):  # fmt: skip
        msg = claude.messages.create(tool_choice=choice, **kw)
        assert msg.stop_reason == "tool_use", msg
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert [u.name for u in uses] == ["get_weather"]
        for use in uses:
            assert use.id.startswith("toolu_")
            jsonschema.validate(use.input, WEATHER["input_schema"])
        with claude.messages.stream(tool_choice=choice, **kw) as stream:
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use"
        assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
            (u.name, u.input) for u in uses
        ]
    use = uses[0]
    history = [
        *question,
        {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "21 degrees and sunny"},
        ]},
    ]  # fmt: skip
    reply = claude.messages.create(model=TINY_NAME, max_tokens=5, messages=history,
                                   tools=[WEATHER], extra_body=GREEDY)  # fmt: skip
    assert reply.stop_reason in ("max_tokens", "tool_use") and reply.usage.output_tokens <= 5
    counts = [
        claude.messages.count_tokens(model=TINY_NAME, messages=m, tools=[WEATHER]).input_tokens
        for m in (question, history)
    ]
    assert counts[1] > counts[0] + len(" 21 degrees and sunny".split())
    none = claude.messages.count_tokens(model=TINY_NAME, messages=question)
    assert none.input_tokens < counts[0]  # the tools are in the prompt
    plain = claude.messages.create(tool_choice={"type": "none"}, **{**kw, "max_tokens": 4})
    assert [b.type for b in plain.content] == ["text"] and plain.stop_reason == "max_tokens"


def test_errors_in_anthropics_shape(keyed_server) -> None:
    url, headers = f"{keyed_server.url}/v1/messages", {"x-api-key": KEYED_KEY}
    good = {"model": TINY_NAME, "max_tokens": 4, "messages": MESSAGES}

    def post(body, path="", **kw) -> httpx.Response:
        kw.setdefault("headers", headers)
        return httpx.post(url + path, json=body, timeout=60, **kw)

    assert "max_tokens" in anthropic_error(post({**good, "max_tokens": None}), 400,
                                           "invalid_request_error")  # fmt: skip
    no_max = {k: v for k, v in good.items() if k != "max_tokens"}
    assert "max_tokens" in anthropic_error(post(no_max), 400, "invalid_request_error")
    for bad in ({"max_tokens": "4"}, {"messages": "hi"}, {"messages": [{"role": "user"}]},
                {"messages": [{"role": "robot", "content": "x"}]}, {"temperature": "hot"},
                {"messages": [{"role": "user", "content": 5}]}, {"max_tokens": 0},
                {"tool_choice": {"type": "tool"}, "tools": [WEATHER]},
                {"stop_sequences": ["x"] * 17}, {"temperature": 7.0},
                {"tools": [{"name": "bad name!", "input_schema": {}}]}):  # fmt: skip
        anthropic_error(post({**good, **bad}), 400, "invalid_request_error")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    for block in (image, {"type": "document", "source": {}}):
        msg = anthropic_error(post({**good, "messages": [{"role": "user", "content": [block]}]}),
                              400, "invalid_request_error")  # fmt: skip
        assert f"'{block['type']}' are not supported" in msg and "text-only" in msg
    anthropic_error(post({**good, "model": "claude-x"}), 404, "not_found_error")
    anthropic_error(post(good, headers={"x-api-key": "wrong"}), 401, "authentication_error")
    anthropic_error(post(good, headers={}), 401, "authentication_error")
    anthropic_error(post(good, path="/nope"), 404, "not_found_error")
    resp = httpx.post(url, content=b"{not json", headers=headers, timeout=30)
    anthropic_error(resp, 400, "invalid_request_error")
    huge = {**good, "messages": [{"role": "user", "content": "x" * (5 * 2**20)}]}
    anthropic_error(post(huge), 413, "request_too_large")
    # thousands of blocks: past the context, refused before any work
    blocks = [{"type": "text", "text": "word " * 20}] * 3000
    many = {**good, "messages": [{"role": "user", "content": blocks}]}
    msg = anthropic_error(post(many), 400, "invalid_request_error")
    assert str(TINY_MAX_MODEL_LEN) in msg
    counted = post({k: v for k, v in many.items() if k != "max_tokens"}, path="/count_tokens")
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 3000 * 20
    # the SDK raises its own error types for them
    claude = anthropic.Anthropic(base_url=keyed_server.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        claude.messages.create(**good)


def test_vllm_gauges_on_the_servers_metrics(keyed_server) -> None:
    text = httpx.get(f"{keyed_server.url}/metrics", timeout=30).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        line = next(x for x in text.splitlines() if x.startswith(f"vllm:{name}{{"))
        assert f'model_name="{TINY_NAME}"' in line
        assert 0.0 <= float(line.rsplit(" ", 1)[1]) <= (1.0 if "perc" in name else 64)


WRONG = [None, "text", 1.5, -1, 2**70, True, [], {}, [[1]], {"a": 1}, "\u0000", "🙂" * 3]


def test_wrong_types_in_every_field_never_5xx(keyed_server) -> None:
    """Each field of a valid request in turn gets values of every wrong type: a 200 or a 4xx in
    Anthropic's shape, streamed or not; the server stays idle and healthy after."""
    body = {"model": TINY_NAME, "max_tokens": 1, "messages": MESSAGES, "system": SYSTEM,
            "stop_sequences": ["x"], "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "metadata": {"user_id": "u"}, "tools": [WEATHER],
            "tool_choice": {"type": "auto"}}  # fmt: skip
    headers = {"x-api-key": KEYED_KEY}
    statuses: set[int] = set()
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=60) as http:
        for field in body:
            for value in WRONG:
                for stream in (False, True):
                    resp = http.post("/v1/messages", json={**body, field: value, "stream": stream})
                    statuses.add(resp.status_code)
                    if resp.status_code != 200:
                        err = resp.json()
                        assert resp.status_code < 500 and err["type"] == "error", resp.text
                        assert err["error"]["type"] == "invalid_request_error" or (
                            resp.status_code == 404 and field == "model"
                        ), resp.text
                    elif stream:
                        assert "event: message_stop" in resp.text, resp.text
    assert 400 in statuses and 200 in statuses
    stats = httpx.get(f"{keyed_server.url}/stats", headers=headers, timeout=10).json()
    assert stats["num_running"] + stats["num_waiting"] == 0
