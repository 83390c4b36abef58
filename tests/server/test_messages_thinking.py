"""/v1/messages with --reasoning-parser, in process: Qwen3's real template and a golden reply
sent one character per step; thinking blocks (whole and streamed, exact event order), earlier
thinking blocks back in the template, `thinking` as enable_thinking, and the anthropic SDK."""

from __future__ import annotations

import importlib
import json
from itertools import groupby
from typing import Any

import anthropic
import pytest
from scripted_engine import mock_http, serving, sse_body

from server.protocol.anthropic import AnthropicMessagesRequest
from server.serving_messages import ServingMessages, to_chat

pytestmark = pytest.mark.timeout(60)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                     "required": ["city"]},
}  # fmt: skip
CALL = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>')  # fmt: skip
TEXT = "<think>\nNo tool needed.\n</think>\n\nIt is sunny."
# the HTTP package the anthropic SDK is built on (httpx2 in recent releases, httpx before)
HTTP = importlib.import_module(anthropic.DefaultHttpxClient.__mro__[1].__module__.split(".")[0])
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def messages(tokenizer, reply: str, parser: str | None = "qwen3") -> tuple[ServingMessages, Any]:
    flags = {"reasoning_parser": parser, "tool_call_parser": "hermes",
             "enable_auto_tool_choice": True}  # fmt: skip
    chat, engine = serving(tokenizer, reply, "qwen3", **flags)
    return ServingMessages(chat), engine


def request(**kw: Any) -> AnthropicMessagesRequest:
    body = {"model": "scripted", "max_tokens": 100, "messages": QUESTION, "tools": [WEATHER]}
    return AnthropicMessagesRequest.model_validate({**body, **kw})


def _thinking(text: str) -> dict:
    return {"type": "thinking", "thinking": text, "signature": ""}


# (reply, content blocks without the tool_use id, stop reason, the streamed events with runs of
# one delta type collapsed: (event, index, delta type))
CASES = [
    (CALL, [_thinking("The user wants the weather."),
            {"type": "tool_use", "name": "get_weather", "input": {"city": "Paris"}}],
     "tool_use", [("content_block_start", 0, None), ("content_block_delta", 0, "thinking_delta"),
                  ("content_block_delta", 0, "signature_delta"), ("content_block_stop", 0, None),
                  ("content_block_start", 1, None),
                  ("content_block_delta", 1, "input_json_delta"),
                  ("content_block_stop", 1, None)]),
    (TEXT, [_thinking("No tool needed."), {"type": "text", "text": "It is sunny."}],
     "end_turn", [("content_block_start", 0, None), ("content_block_delta", 0, "thinking_delta"),
                  ("content_block_delta", 0, "signature_delta"), ("content_block_stop", 0, None),
                  ("content_block_start", 1, None), ("content_block_delta", 1, "text_delta"),
                  ("content_block_stop", 1, None)]),
]  # fmt: skip


def _blocks(content: list[dict]) -> list[dict]:
    return [{k: v for k, v in b.items() if k != "id"} for b in content]


# each delta type → the field it carries
DELTA_KEYS = {"thinking_delta": "thinking", "signature_delta": "signature", "text_delta": "text",
              "input_json_delta": "partial_json"}  # fmt: skip


def _joined(events: list[tuple[str, dict]]) -> list[dict]:
    """The content blocks a client builds from the stream's starts and deltas."""
    blocks: list[dict] = []
    for name, d in events:
        if name == "content_block_start":
            blocks.append(dict(d["content_block"], partial=""))
        elif name == "content_block_delta":
            delta = d["delta"]
            key = DELTA_KEYS[delta["type"]]
            blocks[d["index"]]["partial" if key == "partial_json" else key] += delta[key]
    for b in blocks:
        partial = b.pop("partial")
        if b["type"] == "tool_use":
            b["input"] = json.loads(partial)
    return blocks


@pytest.mark.parametrize("reply,content,reason,collapsed", CASES)
async def test_thinking_block_first_whole_and_streamed(
    tokenizer, reply, content, reason, collapsed
):
    serving_, _ = messages(tokenizer, reply)
    whole = (await serving_.create(request())).model_dump()
    assert (_blocks(whole["content"]), whole["stop_reason"]) == (content, reason)
    stream = await serving_.create(request(stream=True))
    events = [e async for e in stream.events]
    keys = [(n, d.get("index"), (d.get("delta") or {}).get("type")) for n, d in events[2:-2]]
    assert [k for k, _ in groupby(keys)] == collapsed
    assert [n for n, _ in events[:2] + events[-2:]] == [
        "message_start", "ping", "message_delta", "message_stop"]  # fmt: skip
    assert events[2][1]["content_block"] == _thinking("")
    signatures = [d for n, d in events if (d.get("delta") or {}).get("type") == "signature_delta"]
    assert [d["delta"] for d in signatures] == [{"type": "signature_delta", "signature": ""}]
    assert _blocks(_joined(events)) == content
    assert events[-2][1]["delta"] == {"stop_reason": reason, "stop_sequence": None}
    assert events[-2][1]["usage"]["output_tokens"] == len(reply)


async def test_earlier_thinking_reaches_the_template(tokenizer):
    """Interleaved thinking: the thinking block before a tool_use goes back as that turn's
    reasoning_content; without a reasoning parser it is dropped, as before."""
    history = [*QUESTION, {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "I need the weather.", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp": 21}'}]}]  # fmt: skip
    serving_, engine = messages(tokenizer, "It is 21 degrees.")
    whole = await serving_.create(request(messages=history))
    assert whole.content == [{"type": "text", "text": "It is 21 degrees."}]
    assert tokenizer.decode(engine.requests[0][0], False).endswith(
        "<|im_start|>assistant\n<think>\nI need the weather.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    counted = await serving_.count_tokens(request(messages=history))
    assert counted.input_tokens == len(engine.requests[0][0])
    serving_, engine = messages(tokenizer, "It is 21 degrees.", parser=None)
    await serving_.create(request(messages=history))
    assert "I need the weather." not in tokenizer.decode(engine.requests[0][0], False)


async def test_thinking_type_is_enable_thinking(tokenizer):
    assert to_chat(request(thinking={"type": "disabled"})).chat_template_kwargs == {
        "enable_thinking": False}  # fmt: skip
    enabled = request(thinking={"type": "enabled", "budget_tokens": 1024})
    assert to_chat(enabled).chat_template_kwargs == {"enable_thinking": True}
    assert to_chat(request(thinking={"type": "adaptive"})).chat_template_kwargs is None
    serving_, engine = messages(tokenizer, "It is sunny.")
    whole = await serving_.create(request(thinking={"type": "disabled"}))
    assert whole.content == [{"type": "text", "text": "It is sunny."}]
    assert tokenizer.decode(engine.requests[0][0], False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


async def test_a_stop_sequence_in_the_thinking_ends_it(tokenizer):
    serving_, _ = messages(tokenizer, "<think>\nIt is END")
    whole = await serving_.create(request(stop_sequences=["END"], tools=None))
    assert (whole.content, whole.stop_reason, whole.stop_sequence) == (
        [_thinking("It is ")], "stop_sequence", "END")  # fmt: skip
    stream = await serving_.create(request(stop_sequences=["END"], tools=None, stream=True))
    events = [e async for e in stream.events]
    assert _joined(events) == [_thinking("It is ")]
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


async def test_without_a_parser_there_are_no_thinking_blocks(tokenizer):
    serving_, _ = messages(tokenizer, TEXT, parser=None)
    whole = await serving_.create(request(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert whole.content == [{"type": "text", "text": TEXT}]


@pytest.mark.parametrize("reply", [CALL, TEXT])
async def test_the_anthropic_sdk_parses_thinking_blocks(tokenizer, reply):
    serving_, _ = messages(tokenizer, reply)
    whole = (await serving_.create(request())).model_dump_json().encode()
    client = anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1",
                                 http_client=mock_http(whole, False, HTTP))  # fmt: skip
    kw = {"model": "scripted", "max_tokens": 100, "messages": QUESTION, "tools": [WEATHER]}
    parsed = client.messages.create(**kw)
    body = await sse_body(await serving_.create(request(stream=True)))
    client = anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1",
                                 http_client=mock_http(body, True, HTTP))  # fmt: skip
    with client.messages.stream(**kw) as stream:
        thinking = "".join(e.thinking for e in stream if e.type == "thinking")
        streamed = stream.get_final_message()
    thought = "The user wants the weather." if reply == CALL else "No tool needed."
    assert thinking == thought
    for message in (parsed, streamed):
        first, second = message.content
        assert (first.type, first.thinking, first.signature) == ("thinking", thought, "")
        if reply == CALL:
            assert (second.type, second.name, second.input) == (
                "tool_use", "get_weather", {"city": "Paris"})  # fmt: skip
        else:
            assert (second.type, second.text) == ("text", "It is sunny.")
