"""POST /v1/chat/completions on a real server: template, shapes, logprobs, n, streaming, usage."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from e2e_helpers import TINY_MAX_MODEL_LEN, TINY_NAME, without_cached

pytestmark = pytest.mark.timeout(90)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]


def chat(client: openai.OpenAI, messages=MESSAGES, max_tokens: int | None = 8, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    return client.chat.completions.create(
        model=TINY_NAME, messages=messages, temperature=0, extra_body=extra, **kw
    )


def prompt_tokens(url: str, messages: list[dict]) -> int:
    return httpx.post(f"{url}/tokenize", json={"messages": messages}, timeout=10).json()["count"]


def test_response_shape_and_usage(tiny_server) -> None:
    body = {"model": TINY_NAME, "messages": MESSAGES, "max_tokens": 5, "ignore_eos": True}
    raw = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60).json()
    assert set(raw) == {"id", "object", "created", "model", "choices", "usage"}
    assert raw["object"] == "chat.completion" and raw["id"].startswith("chatcmpl-")
    assert raw["model"] == TINY_NAME and isinstance(raw["created"], int)
    (choice,) = raw["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"]["role"] == "assistant" and isinstance(
        choice["message"]["content"], str
    )
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    n_prompt = prompt_tokens(tiny_server.url, MESSAGES)
    usage = without_cached(raw["usage"])
    assert usage == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 5,
        "total_tokens": n_prompt + 5,
    }


def test_text_parts_equal_string_content(client: openai.OpenAI) -> None:
    parts = [
        MESSAGES[0],
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    assert chat(client, parts).choices[0].message.content == chat(client).choices[0].message.content


def test_max_completion_tokens_and_default_up_to_context(
    client: openai.OpenAI, tiny_server
) -> None:
    assert chat(client, max_tokens=3).usage.completion_tokens == 3
    out = chat(client, max_tokens=50, max_completion_tokens=4)
    assert out.usage.completion_tokens == 4
    # default: the rest of the context (a prompt that leaves ~40 tokens of it, to generate fast)
    filler = MESSAGES[-1]["content"] + " word" * 8
    long = [MESSAGES[0], {"role": "user", "content": filler}]
    per_word = prompt_tokens(tiny_server.url, long) - prompt_tokens(tiny_server.url, MESSAGES)
    words = (TINY_MAX_MODEL_LEN - prompt_tokens(tiny_server.url, MESSAGES) - 40) * 8 // per_word
    long = [MESSAGES[0], {"role": "user", "content": MESSAGES[-1]["content"] + " word" * words}]
    n_prompt = prompt_tokens(tiny_server.url, long)
    assert TINY_MAX_MODEL_LEN - 60 < n_prompt < TINY_MAX_MODEL_LEN - 20
    full = chat(client, long, max_tokens=None)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.total_tokens == TINY_MAX_MODEL_LEN


def test_stream_equals_non_stream_with_role_first(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=12, n=2)
    chunks = list(chat(client, max_tokens=12, n=2, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    texts, first, finish = {0: "", 1: ""}, {}, {}
    for chunk in chunks:
        for c in chunk.choices:
            first.setdefault(c.index, c.delta)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert first[0].role == "assistant" and first[1].role == "assistant"
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert texts[0] == texts[1]  # greedy: both samples agree
    assert finish == {0: "length", 1: "length"}


def test_stream_usage_chunk_and_done(tiny_server) -> None:
    body = {"model": TINY_NAME, "messages": MESSAGES, "max_tokens": 4, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == []
    n_prompt = prompt_tokens(tiny_server.url, MESSAGES)
    usage = without_cached(chunks[-1]["usage"])
    assert usage == {
        "prompt_tokens": n_prompt,
        "completion_tokens": 4,
        "total_tokens": n_prompt + 4,
    }


def test_logprobs_new_shape(client: openai.OpenAI) -> None:
    out = chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content
    joined = b"".join(bytes(t.bytes) for t in content)  # raw token bytes join to the text
    assert joined.decode("utf-8", "replace") == out.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)  # greedy
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )
    just = chat(client, max_tokens=2, logprobs=True).choices[0].logprobs.content
    assert len(just) == 2 and all(t.top_logprobs == [] for t in just)
    streamed = [
        t
        for c in chat(client, max_tokens=5, logprobs=True, top_logprobs=3, stream=True)
        for ch in c.choices
        if ch.logprobs
        for t in ch.logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_stop_and_seed(client: openai.OpenAI) -> None:
    text = chat(client, max_tokens=10).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = chat(client, max_tokens=10, stop=stop)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == text[: text.index(stop)]

    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model=TINY_NAME, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        ).choices[0].message.content  # fmt: skip

    assert sample(7) == sample(7)
