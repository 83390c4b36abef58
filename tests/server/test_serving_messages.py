"""Anthropic requests → the chat request they run as (no model): messages, tools, choices."""

from __future__ import annotations

import pytest

from server.errors import APIError
from server.protocol.anthropic import AnthropicMessagesRequest
from server.serving_messages import _cut_stop, _events, to_chat
from tests.server.chat_chunks import chunk

pytestmark = pytest.mark.timeout(10)

TOOL = {"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {}}}


def request(**kw) -> AnthropicMessagesRequest:
    return AnthropicMessagesRequest.model_validate({"model": "m", "max_tokens": 5, **kw})


def test_blocks_become_chat_messages_in_order() -> None:
    req = request(
        system=[{"type": "text", "text": "be"}, {"type": "text", "text": "brief"}],
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1",
                 "content": [{"type": "text", "text": "r1"}]},
                {"type": "text", "text": "thanks"},
            ]},
        ],
    )  # fmt: skip
    messages = [m.to_template() for m in to_chat(req).messages]
    assert messages == [
        {"role": "system", "content": "be\nbrief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "r1", "tool_call_id": "t1"},
        {"role": "user", "content": "thanks"},
    ]  # fmt: skip


def test_tool_choice_sampling_and_stop_sequences() -> None:
    chat = to_chat(request(messages=[{"role": "user", "content": "x"}], tools=[TOOL],
                           tool_choice={"type": "any", "disable_parallel_tool_use": True},
                           temperature=0.5, top_k=3, stop_sequences=["END"], stream=True,
                           metadata={"user_id": "u"}, ignore_eos=True))  # fmt: skip
    assert (chat.tool_mode, chat.parallel_tool_calls) == ("required", False)
    assert chat.tools[0].function.model_dump(exclude_none=True) == {
        "name": "f", "description": "d", "parameters": TOOL["input_schema"]}  # fmt: skip
    assert (chat.max_tokens, chat.temperature, chat.top_k, chat.user) == (5, 0.5, 3, "u")
    assert (chat.stop, chat.include_stop_str_in_output, chat.ignore_eos) == (["END"], True, True)
    assert chat.include_usage
    named = to_chat(request(messages=[], tools=[TOOL], tool_choice={"type": "tool", "name": "f"}))
    assert named.tool_mode == "named" and named.tool_choice.function.name == "f"
    none = to_chat(request(messages=[], tools=[TOOL], tool_choice={"type": "none"}))
    assert none.tool_mode == "none" and none.tools is None
    with pytest.raises(APIError, match="'any' needs tools"):
        to_chat(request(messages=[], tool_choice={"type": "any"}))
    with pytest.raises(APIError, match="needs a name"):
        to_chat(request(messages=[], tools=[TOOL], tool_choice={"type": "tool"}))
    with pytest.raises(APIError, match="cannot hold tool_use"):
        to_chat(request(messages=[{"role": "user", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]))  # fmt: skip


def test_cut_stop_names_the_longest_match() -> None:
    assert _cut_stop("abc END", ["D", "END"]) == ("abc ", "END")
    assert _cut_stop("abc", ["x"]) == ("abc", None)


async def events_of(chunks: list, stops: list[str]) -> list[tuple[str, dict]]:
    async def gen():
        for c in chunks:
            yield c

    return [e async for e in _events("msg_1", "m", gen(), stops, 12)]


@pytest.mark.timeout(10)
async def test_stream_of_text_then_tool_use_blocks() -> None:
    events = await events_of([
        chunk(content="Hi"), chunk(call=("call_1", "f", "")), chunk(call=(None, None, '{"a":')),
        chunk(call=(None, None, "1}")), chunk(finish="tool_calls"), chunk(usage=(12, 6, 8)),
    ], [])  # fmt: skip
    assert [(n, d.get("index"), d.get("delta")) for n, d in events[2:-2]] == [
        ("content_block_start", 0, None),
        ("content_block_delta", 0, {"type": "text_delta", "text": "Hi"}),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, None),
        ("content_block_delta", 1, {"type": "input_json_delta", "partial_json": '{"a":'}),
        ("content_block_delta", 1, {"type": "input_json_delta", "partial_json": "1}"}),
        ("content_block_stop", 1, None),
    ]  # fmt: skip
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "toolu_1", "name": "f",
                                             "input": {}}  # fmt: skip
    assert events[0][1]["message"]["usage"]["input_tokens"] == 12
    assert events[-2][1] == {
        "type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 4, "output_tokens": 6, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 8},
    }  # fmt: skip
    assert events[-1] == ("message_stop", {"type": "message_stop"})


@pytest.mark.timeout(10)
async def test_a_stop_sequence_split_over_deltas_is_held_back_and_cut() -> None:
    events = await events_of(
        [chunk(content="abc E"), chunk(content="N"), chunk(content="D"), chunk(finish="stop"),
         chunk(usage=(12, 3, 0))], ["END", "zz"])  # fmt: skip
    texts = [d["delta"]["text"] for n, d in events if n == "content_block_delta"]
    assert "".join(texts) == "abc " and all("E" not in t for t in texts)
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_a_final_assistant_turn_is_continued() -> None:
    prefill = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer:"}]
    chat = to_chat(request(messages=prefill))
    assert (chat.continue_final_message, chat.add_generation_prompt) == (True, False)
    closed = to_chat(request(messages=prefill[:1]))
    assert (closed.continue_final_message, closed.add_generation_prompt) == (False, True)
