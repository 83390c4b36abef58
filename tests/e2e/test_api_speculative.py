"""`tokenmill serve --speculative-config` on SmolLM2: a grounded reply drafts and accepts tokens,
streamed and whole replies agree, and /metrics and `timings` report the drafts."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
        "prompt_lookup_max": 4}  # fmt: skip
PASSAGE = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps under the old oak tree, and "
    "the fox runs into the forest to find its family before the sun goes down."
)


@pytest.fixture(scope="module")
def spec_server(launch_server, smollm2_gguf: str):
    args = ["--speculative-config", json.dumps(SPEC), "--max-model-len", "1024",
            "--kv-cache-memory", "64MiB", "--log-level", "info"]  # fmt: skip
    return launch_server(args)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


@pytest.mark.timeout(300)
def test_grounded_reply_drafts_and_reports(spec_server) -> None:
    client = openai.OpenAI(base_url=f"{spec_server.url}/v1", api_key="x", max_retries=0,
                           timeout=120)  # fmt: skip
    messages = [{"role": "user", "content": f"Repeat this text exactly: {PASSAGE}"}]
    kw = dict(model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=48)
    out = client.chat.completions.create(**kw, extra_body={"timings_per_token": True})
    text = out.choices[0].message.content
    assert "quick brown fox" in text
    timings = out.model_extra["timings"]
    assert timings["draft_n"] > 0 and 0 < timings["draft_n_accepted"] <= timings["draft_n"]
    streamed = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    assert metric(spec_server.url, "vllm:spec_decode_num_drafts_total") > 0
    accepted = metric(spec_server.url, "tokenmill_spec_decode_num_accepted_tokens_total")
    assert accepted == metric(spec_server.url, "vllm:spec_decode_num_accepted_tokens_total") > 0
    assert metric(spec_server.url, "tokenmill_spec_decode_acceptance_length_count") > 0
    assert "speculative decoding: SpeculativeConfig(method='ngram'" in spec_server.log()
