"""/v1/responses with --reasoning-parser, in process: Qwen3's real template and a golden reply
sent one character per step; reasoning items (whole and streamed, exact event order), earlier
reasoning items back in the template (input and previous_response_id), and the openai SDK."""

from __future__ import annotations

from itertools import groupby
from typing import Any

import openai
import pytest
from scripted_engine import mock_http, serving, sse_body

from server.protocol.responses import ResponsesRequest
from server.response_store import ResponseStore
from server.serving_responses import ServingResponses, chat_messages, stored_items

pytestmark = pytest.mark.timeout(60)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}  # fmt: skip
CALL = ('<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>')  # fmt: skip
TEXT = "<think>\nNo tool needed.\n</think>\n\nIt is sunny."
PARIS = '{"city": "Paris"}'
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def responses(tokenizer, reply: str, parser: str | None = "qwen3") -> tuple[ServingResponses, Any]:
    flags = {"reasoning_parser": parser, "tool_call_parser": "hermes",
             "enable_auto_tool_choice": True}  # fmt: skip
    chat, engine = serving(tokenizer, reply, "qwen3", **flags)
    return ServingResponses(chat, ResponseStore(10, 10**6)), engine


def request(**kw: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "scripted", "tools": [WEATHER], **kw})


def _shape(item: dict) -> dict:
    """An output item without its random ids."""
    return {k: v for k, v in item.items() if k not in ("id", "call_id")}


REASONING = {"type": "reasoning", "summary": [], "status": "completed"}
MESSAGE = {"type": "message", "status": "completed", "role": "assistant"}
# (reply, its output items without ids, the streamed event names with delta runs collapsed)
CASES = [
    (CALL, [
        {**REASONING, "content": [{"type": "reasoning_text",
                                   "text": "The user wants the weather."}]},
        {"type": "function_call", "name": "get_weather", "arguments": PARIS,
         "status": "completed"},
    ], ["output_item.added", "content_part.added", "reasoning_text.delta",
        "reasoning_text.done", "content_part.done", "output_item.done",
        "output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
        "output_item.done"]),
    (TEXT, [
        {**REASONING, "content": [{"type": "reasoning_text", "text": "No tool needed."}]},
        {**MESSAGE, "content": [{"type": "output_text", "text": "It is sunny.",
                                 "annotations": [], "logprobs": []}]},
    ], ["output_item.added", "content_part.added", "reasoning_text.delta",
        "reasoning_text.done", "content_part.done", "output_item.done",
        "output_item.added", "content_part.added", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done"]),
]  # fmt: skip


@pytest.mark.parametrize("reply,output,names", CASES)
async def test_reasoning_item_first_whole_and_streamed(tokenizer, reply, output, names):
    serving_, _ = responses(tokenizer, reply)
    whole = (await serving_.create(request(input=QUESTION), "")).model_dump()
    assert [_shape(o) for o in whole["output"]] == output
    assert whole["output"][0]["id"].startswith("rs_")
    assert whole["usage"]["output_tokens"] == len(reply)
    stream = await serving_.create(request(input=QUESTION, stream=True), "")
    events = [e async for e in stream.events]
    collapsed = [name.removeprefix("response.") for name, _ in groupby(n for n, _ in events)]
    assert collapsed == ["created", "in_progress", *names, "completed"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert [_shape(o) for o in final["output"]] == output
    thought = output[0]["content"][0]["text"]
    deltas = [d for n, d in events if n == "response.reasoning_text.delta"]
    assert "".join(d["delta"] for d in deltas) == thought
    rs_id = final["output"][0]["id"]
    assert {(d["item_id"], d["output_index"], d["content_index"]) for d in deltas} == {
        (rs_id, 0, 0)}  # fmt: skip
    added = events[2][1]["item"]
    assert added == {"type": "reasoning", "id": rs_id, "summary": [], "content": [],
                     "status": "in_progress"}  # fmt: skip
    done = [d for n, d in events if n == "response.reasoning_text.done"]
    assert [(d["text"], d["item_id"]) for d in done] == [(thought, rs_id)]
    assert serving_.store.get(final["id"], "").response == final


async def test_earlier_reasoning_reaches_the_template_from_input_and_from_the_store(tokenizer):
    """Interleaved thinking: a reasoning item before a call goes back as that assistant turn's
    reasoning_content, whether sent as input or kept with a previous response."""
    tail = ("<|im_start|>assistant\n<think>\n{}\n</think>\n\n<tool_call>\n"
            '{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\n{{"temp": 21}}\n</tool_response><|im_end|>\n'
            "<|im_start|>assistant\n")  # fmt: skip
    serving_, engine = responses(tokenizer, "It is 21 degrees.")
    output = {"type": "function_call_output", "call_id": "call_1", "output": '{"temp": 21}'}
    items = [
        {"role": "user", "content": QUESTION},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "I need the weather."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": PARIS},
        output,
    ]  # fmt: skip
    whole = await serving_.create(request(input=items), "")
    assert whole.output[0]["content"][0]["text"] == "It is 21 degrees."
    prompt = tokenizer.decode(engine.requests[0][0], False)
    assert prompt.endswith(tail.format("I need the weather."))
    serving_, engine = responses(tokenizer, CALL)
    first = await serving_.create(request(input=QUESTION), "")
    call_id = first.output[1]["call_id"]
    await serving_.create(
        request(input=[{**output, "call_id": call_id}], previous_response_id=first.id), ""
    )
    prompt = tokenizer.decode(engine.requests[1][0], False)
    assert prompt.endswith(tail.format("The user wants the weather."))


def test_reasoning_items_open_the_next_assistant_turn_only_with_a_parser() -> None:
    req = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "a summary"}]},
        {"type": "message", "role": "assistant", "content": "hello"},
        {"type": "reasoning", "summary": [], "content": [
            {"type": "reasoning_text", "text": "one"}, {"type": "reasoning_text", "text": "two"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "x"},
    ]})  # fmt: skip
    items = stored_items(req)
    assert items[1]["summary"] == [{"type": "summary_text", "text": "a summary"}]
    assert "content" not in items[1] and items[3]["content"][1] == {
        "type": "reasoning_text", "text": "two"}  # fmt: skip
    assert chat_messages(items, reasoning=True) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "a summary"},
        {"role": "assistant", "content": "", "reasoning_content": "one\ntwo"},
    ]
    assert chat_messages(items) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]


async def test_without_a_parser_the_reply_is_one_message(tokenizer):
    serving_, _ = responses(tokenizer, TEXT, parser=None)
    whole = await serving_.create(request(input=QUESTION), "")
    assert [o["type"] for o in whole.output] == ["message"]
    assert whole.output[0]["content"][0]["text"] == TEXT


@pytest.mark.parametrize("reply", [CALL, TEXT])
async def test_the_openai_sdk_parses_reasoning_items(tokenizer, reply):
    serving_, _ = responses(tokenizer, reply)
    whole = (await serving_.create(request(input=QUESTION), "")).model_dump_json()
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1/v1",
                           http_client=mock_http(whole.encode(), stream=False))  # fmt: skip
    parsed = client.responses.create(model="scripted", input=QUESTION)
    body = await sse_body(await serving_.create(request(input=QUESTION, stream=True), ""))
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1/v1",
                           http_client=mock_http(body, stream=True))  # fmt: skip
    with client.responses.stream(model="scripted", input=QUESTION) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        streamed = stream.get_final_response()
    thought = "The user wants the weather." if reply == CALL else "No tool needed."
    assert "".join(deltas) == thought
    for response in (parsed, streamed):
        reasoning = response.output[0]
        assert (reasoning.type, reasoning.summary) == ("reasoning", [])
        assert [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", thought)]
        if reply == CALL:
            assert (response.output[1].type, response.output[1].arguments) == (
                "function_call", PARIS)  # fmt: skip
        else:
            assert response.output_text == "It is sunny."
