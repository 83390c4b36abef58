"""POST /v1/completions on a real server: prompt forms, parameters, logprobs, echo, streaming."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from e2e_helpers import TINY_NAME, without_cached

pytestmark = pytest.mark.timeout(90)

PROMPT = "The quick brown fox"


def greedy(client: openai.OpenAI, prompt=PROMPT, max_tokens: int = 8, **kw):
    return client.completions.create(
        model=TINY_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, **kw.pop("extra_body", {})},
        **kw,
    )


def count_tokens(url: str, text: str) -> int:
    return httpx.post(f"{url}/tokenize", json={"prompt": text}, timeout=10).json()["count"]


def sse_events(url: str, body: dict) -> list[str]:
    """Raw `data:` payloads of a streamed response, in order."""
    with httpx.stream("POST", url, json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]


def test_response_shape_and_usage(client: openai.OpenAI, tiny_server) -> None:
    raw = httpx.post(
        f"{tiny_server.url}/v1/completions",
        json={"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True},
        timeout=60,
    ).json()
    assert set(raw) == {"id", "object", "created", "model", "choices", "usage"}
    assert raw["object"] == "text_completion" and raw["model"] == TINY_NAME
    assert raw["id"].startswith("cmpl-") and isinstance(raw["created"], int)
    (choice,) = raw["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    prompt_tokens = count_tokens(tiny_server.url, PROMPT)
    assert without_cached(raw["usage"]) == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    }


def test_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    out = client.completions.create(model=TINY_NAME, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_prompt_forms_and_n(client: openai.OpenAI, tiny_server) -> None:
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = greedy(client, PROMPT).choices[0].text
    assert greedy(client, ids).choices[0].text == by_text  # token ids == the same text
    many = greedy(client, [PROMPT, "Hello"], n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == by_text  # greedy: n samples agree
    assert many.choices[2].text == greedy(client, "Hello").choices[0].text
    assert many.usage.prompt_tokens == len(ids) + count_tokens(tiny_server.url, "Hello")
    assert many.usage.completion_tokens == 4 * 8
    lists = greedy(client, [ids, ids[:2]])
    assert lists.choices[0].text == by_text and len(lists.choices) == 2


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    full = greedy(client, [PROMPT, "Once upon"], max_tokens=12, n=2)
    chunks = list(greedy(client, [PROMPT, "Once upon"], max_tokens=12, n=2, stream=True))
    texts = dict.fromkeys(range(4), "")
    finish = {}
    for chunk in chunks:
        assert chunk.object == "text_completion" and chunk.id.startswith("cmpl-")
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert finish == dict.fromkeys(range(4), "length")


def test_stream_usage_chunk_and_done(tiny_server) -> None:
    body = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 6, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse_events(f"{tiny_server.url}/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["prompt_tokens"] == count_tokens(tiny_server.url, PROMPT)
    assert all(c["usage"] is None for c in chunks[:-1])
    # without include_usage: no usage chunk
    body.pop("stream_options")
    plain = [json.loads(e) for e in sse_events(f"{tiny_server.url}/v1/completions", body)[:-1]]
    assert all(c["choices"] for c in plain)


def test_logprobs_legacy_shape(client: openai.OpenAI) -> None:
    out = greedy(client, max_tokens=6, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    text = out.choices[0].text
    assert "".join(lp.tokens) == text
    assert_offsets(text, lp.tokens, lp.text_offset)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the best token
        assert top[token] == pytest.approx(logprob, abs=1e-4)


def test_echo_prepends_prompt(client: openai.OpenAI) -> None:
    plain = greedy(client, max_tokens=4).choices[0].text
    echoed = greedy(client, max_tokens=4, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    streamed = "".join(
        c.choices[0].text for c in greedy(client, max_tokens=4, echo=True, stream=True)
    )
    assert streamed == echoed


def test_stop_string_and_stop_token_ids(client: openai.OpenAI) -> None:
    out = greedy(client, max_tokens=10, logprobs=0)
    text, tokens = out.choices[0].text, out.choices[0].logprobs.tokens
    stop = tokens[3]
    cut = greedy(client, max_tokens=10, stop=[stop, "\u2603never"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    streamed = "".join(
        c.choices[0].text for c in greedy(client, max_tokens=10, stop=stop, stream=True)
    )
    assert streamed == cut.choices[0].text


def test_stop_token_ids(client: openai.OpenAI, tiny_server) -> None:
    full = greedy(client, max_tokens=10)
    ids = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    # the third generated token, found by generating 3 tokens from the same prompt
    three = greedy(client, ids, max_tokens=3, logprobs=0).choices[0].logprobs.tokens
    tok = httpx.post(
        f"{tiny_server.url}/tokenize",
        json={"prompt": three[2], "add_special_tokens": False},
    ).json()["tokens"]
    out = greedy(client, max_tokens=10, extra_body={"stop_token_ids": tok[:1]})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens <= 3 < full.usage.completion_tokens


def test_logit_bias_forces_a_token(client: openai.OpenAI, tiny_server) -> None:
    tok = httpx.post(
        f"{tiny_server.url}/tokenize",
        json={"prompt": " banana", "add_special_tokens": False, "return_token_strs": True},
    ).json()
    token_id, token_str = tok["tokens"][-1], tok["token_strs"][-1]
    out = greedy(client, max_tokens=5, logit_bias={str(token_id): 100}, logprobs=0)
    assert out.choices[0].logprobs.tokens == [token_str] * 5


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(
            model=TINY_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, n=2, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return [c.text for c in out.choices]

    a, b = sample(1234), sample(1234)
    assert a == b
    assert sample(99) != a


def test_top_k_1_and_min_p_1_are_greedy(client: openai.OpenAI) -> None:
    want = greedy(client, max_tokens=8).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        out = client.completions.create(
            model=TINY_NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5,
            extra_body={"ignore_eos": True, **extra},
        )  # fmt: skip
        assert out.choices[0].text == want, extra


def test_penalties_and_extras_are_accepted(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=TINY_NAME, prompt=PROMPT, max_tokens=6, temperature=0.7, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=0.5, user="tester",
        extra_body={"repetition_penalty": 1.3, "min_tokens": 6, "ignore_eos": False,
                    "top_k": 50, "min_p": 0.01},
    )  # fmt: skip
    assert out.usage.completion_tokens == 6  # min_tokens == max_tokens: EOS cannot end it early
    # a strong repetition penalty makes greedy output avoid repeating tokens it produced
    plain = greedy(client, max_tokens=12, logprobs=0).choices[0].logprobs.tokens
    penal = greedy(client, max_tokens=12, logprobs=0, extra_body={"repetition_penalty": 2.0})
    toks = penal.choices[0].logprobs.tokens
    if len(set(plain)) < len(plain):
        assert toks != plain


def assert_offsets(text: str, tokens: list[str], offsets: list[int]) -> None:
    """Each whole-character token sits at its text_offset; offsets never pass the text."""
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)
    for token, offset in zip(tokens, offsets, strict=True):
        if not token.startswith("bytes:"):
            assert text[offset : offset + len(token)] == token, (token, offset, text)


PARTIAL = 177  # SmolLM2 byte-level token 'æ': the byte 0xe6 alone, the lead byte of '日'


def test_logprobs_of_partial_utf8_tokens(tiny_server, client: openai.OpenAI) -> None:
    """A token that is half a character: bytes are its raw byte, offsets count characters."""
    bias = {str(PARTIAL): 100}
    out = greedy(client, max_tokens=4, logprobs=1, logit_bias=bias)
    lp = out.choices[0].logprobs
    text = out.choices[0].text
    assert lp.tokens == ["bytes:\\xe6"] * 4 and text == "\ufffd" * 4
    assert lp.text_offset == [0, 0, 1, 2]  # each completes (as U+FFFD) when the next arrives
    got = client.chat.completions.create(
        model=TINY_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0.0, logprobs=True, logit_bias=bias,
    )  # fmt: skip
    content = got.choices[0].logprobs.content
    assert [t.bytes for t in content] == [[0xE6]] * 3  # raw bytes, not b"bytes:\\xe6"
    joined = b"".join(bytes(t.bytes) for t in content)
    assert joined.decode("utf-8", "replace") == got.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_logprobs_stop_at_a_stop_string(tiny_server, client: openai.OpenAI, stream) -> None:
    """Only tokens whose text was returned get logprobs: none of the stop string's."""
    full = greedy(client, max_tokens=12, logprobs=1)
    text = full.choices[0].text
    toks = full.choices[0].logprobs.tokens
    k = len(toks) // 2
    stop = "".join(toks[k : k + 2])  # two whole tokens in the middle
    want = text[: text.index(stop)]
    body = {"model": TINY_NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 1, "stop": [stop], "stream": stream}  # fmt: skip
    if stream:
        chunks = [json.loads(e) for e in sse_events(f"{tiny_server.url}/v1/completions", body)[:-1]]
        got = "".join(c["choices"][0]["text"] for c in chunks)
        tokens = [t for c in chunks if c["choices"][0]["logprobs"]
                  for t in c["choices"][0]["logprobs"]["tokens"]]  # fmt: skip
        offsets = [o for c in chunks if c["choices"][0]["logprobs"]
                   for o in c["choices"][0]["logprobs"]["text_offset"]]  # fmt: skip
    else:
        resp = httpx.post(f"{tiny_server.url}/v1/completions", json=body, timeout=60).json()
        got, lp = resp["choices"][0]["text"], resp["choices"][0]["logprobs"]
        tokens, offsets = lp["tokens"], lp["text_offset"]
    assert got == want
    assert "".join(tokens) == want, (tokens, want)
    assert_offsets(want, tokens, offsets)
