"""--reasoning-parser qwen3 with --tool-call-parser hermes on a real server (the default
SmolLM2): its reasoning split off whole and streamed, a JSON schema applied only after the
reasoning, and a native call parsed, streamed and not. SmolLM2 copies the `<think>` pattern of
a few earlier answers greedily (its template keeps them), which makes the markup deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
# NOTE: the golden texts are the exact path's greedy output (float32 activations, within 1e-3 of
# transformers); the int8 path's rounding would pick other near-tie tokens on other CPUs
FLAGS = ["--reasoning-parser", "qwen3", "--tool-call-parser", "hermes",
         "--enable-auto-tool-choice", "--max-model-len", "2048",
         "--activation-dtype", "float32"]  # fmt: skip
FEW_SHOT = [
    {"role": "system", "content": "Think first, then close your thoughts with </think> and "
     "answer in one word."},
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "<think>\nThe capital of Italy is Rome.\n</think>\n\nRome"},
    {"role": "user", "content": "What is the capital of Spain?"},
    {"role": "assistant",
     "content": "<think>\nThe capital of Spain is Madrid.\n</think>\n\nMadrid"},
    {"role": "user", "content": "What is the capital of France?"},
]  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def server(launch_server):
    return launch_server(FLAGS)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)


def _stream(client: openai.OpenAI, **kw) -> tuple[dict, dict]:
    """A streamed answer joined: reasoning, content, calls (name, arguments), finish; usage."""
    joined = {"reasoning": "", "content": "", "calls": {}, "finish": None}
    usage = None
    for chunk in client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        usage = chunk.usage or usage
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            assert extra.get("reasoning") == extra.get("reasoning_content")
            joined["reasoning"] += extra.get("reasoning") or ""
            joined["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.id is not None:
                    joined["calls"][tc.index] = [tc.function.name, ""]
                joined["calls"][tc.index][1] += tc.function.arguments or ""
            joined["finish"] = c.finish_reason or joined["finish"]
    joined["calls"] = [tuple(joined["calls"][i]) for i in sorted(joined["calls"])]
    return joined, _counts(usage.model_dump())


def _counts(usage: dict) -> dict:
    """Token counts (cached_tokens differs as the prefix cache fills)."""
    return {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _whole(client: openai.OpenAI, **kw) -> tuple[dict, dict]:
    resp = client.chat.completions.create(**kw)
    choice = resp.choices[0]
    extra = choice.message.model_extra or {}
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    joined = {"reasoning": extra.get("reasoning") or "", "content": choice.message.content or "",
              "calls": calls, "finish": choice.finish_reason}  # fmt: skip
    assert extra.get("reasoning_content") == extra.get("reasoning")
    return joined, _counts(resp.usage.model_dump())


def _num_tokens(server, text: str) -> int:
    body = {"prompt": text, "add_special_tokens": False}
    return httpx.post(f"{server.url}/tokenize", json=body, timeout=30).json()["count"]


def test_reasoning_is_split_off_whole_and_streamed(server, client):
    kw = dict(model=MODEL, messages=FEW_SHOT, temperature=0, max_tokens=40)
    whole, usage = _whole(client, **kw)
    assert whole == {"reasoning": "The capital of France is Paris.", "content": "Paris",
                     "calls": [], "finish": "stop"}  # fmt: skip
    assert _stream(client, **kw) == (whole, usage)
    raw = "<think>\nThe capital of France is Paris.\n</think>\n\nParis"
    # every token counts, the reasoning's and the tags' too (plus the end-of-turn token)
    assert usage["completion_tokens"] == _num_tokens(server, raw) + 1


def test_a_json_schema_applies_after_the_reasoning(client):
    """The schema's grammar starts at `</think>`: the reasoning before it is free text."""
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"]}  # fmt: skip
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    kw = dict(model=MODEL, messages=FEW_SHOT, temperature=0, max_tokens=60, response_format=rf)
    whole, usage = _whole(client, **kw)
    assert whole["reasoning"] == "The capital of France is Paris."  # not JSON: no grammar yet
    assert json.loads(whole["content"]) == {"capital": ""} and whole["finish"] == "stop"
    assert _stream(client, **kw) == (whole, usage)


def test_a_native_tool_call_is_parsed_whole_and_streamed(client):
    """tool_choice required: the call grammar in hermes' format, after any reasoning."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
              temperature=0, max_tokens=120)  # fmt: skip
    whole, usage = _whole(client, **kw)
    assert whole == {"reasoning": "", "content": "", "finish": "tool_calls",
                     "calls": [("get_weather", '{"city":"Paris"}')]}  # fmt: skip
    assert usage["prompt_tokens"] == 119  # SmolLM2's template takes no tools: the preamble
    assert _stream(client, **kw) == (whole, usage)


def test_reasoning_then_a_native_call(client):
    """After the few-shot answers SmolLM2 thinks first; the required call comes after it."""
    messages = [*FEW_SHOT[:-1], {"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
              temperature=0, max_tokens=120)  # fmt: skip
    whole, usage = _whole(client, **kw)
    call = ("get_weather", '{"city":"Paris"}')
    assert whole == {"reasoning": "The weather in Paris is hot and sunny.", "content": "",
                     "calls": [call], "finish": "tool_calls"}  # fmt: skip
    assert _stream(client, **kw) == (whole, usage)


@pytest.fixture(scope="module")
def qwen3_server(launch_server):
    """The same flags with Qwen3's own chat template (SmolLM2 speaks its ChatML tokens)."""
    template = REPO / "tests" / "server" / "chat_templates" / "qwen3.jinja"
    return launch_server([*FLAGS, "--chat-template", str(template)])


def test_qwen3_template_thinking_off_and_interleaved_reasoning(qwen3_server):
    """enable_thinking false closes the reasoning in the prompt: the schema applies from the
    first token and nothing is reasoning. An earlier turn's reasoning (either name) reaches the
    template, which writes it back before that turn's call."""
    client = openai.OpenAI(base_url=f"{qwen3_server.url}/v1", api_key="x", max_retries=0,
                           timeout=300)  # fmt: skip
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"]}  # fmt: skip
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    kw = dict(model=MODEL, messages=FEW_SHOT[1:], temperature=0, max_tokens=30,
              response_format=rf, extra_body=off)  # fmt: skip
    whole, usage = _whole(client, **kw)
    assert whole == {"reasoning": "", "content": '{"capital":"Paris","country":"FRANCE"}',
                     "calls": [], "finish": "stop"}  # fmt: skip
    assert _stream(client, **kw) == (whole, usage)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    for key in ("reasoning", "reasoning_content"):
        messages = [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                key: "I need the weather.",
                "tool_calls": [call],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]
        ids = httpx.post(f"{qwen3_server.url}/tokenize", json={"messages": messages},
                         timeout=30).json()["tokens"]  # fmt: skip
        text = httpx.post(f"{qwen3_server.url}/detokenize", json={"tokens": ids},
                          timeout=30).json()["prompt"]  # fmt: skip
        assert text == (  # /detokenize leaves out the special <|im_start|> / <|im_end|>
            "user\nWhat is the weather in Paris?\nassistant\n<think>\nI need the weather.\n"
            '</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\nuser\n<tool_response>\n{"temp": 21}\n</tool_response>\nassistant\n'
        )


def test_qwen3_template_takes_the_tools_and_the_call_is_native(qwen3_server):
    """The tools go to Qwen3's template (its `# Tools` system block, no preamble); the required
    call is written in its hermes format and parsed, whole and streamed."""
    client = openai.OpenAI(base_url=f"{qwen3_server.url}/v1", api_key="x", max_retries=0,
                           timeout=300)  # fmt: skip
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required",
              temperature=0, max_tokens=120)  # fmt: skip
    whole, usage = _whole(client, **kw)
    assert whole == {"reasoning": "", "content": "", "finish": "tool_calls",
                     "calls": [("get_weather", '{"city":"Paris"}')]}  # fmt: skip
    assert usage["prompt_tokens"] == 173  # Qwen3's tools block (tokenmill's preamble: 119)
    assert _stream(client, **kw) == (whole, usage)
