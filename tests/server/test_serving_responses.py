"""Responses requests → stored items and the chat request they run as (no model)."""

from __future__ import annotations

import pytest

from server.protocol.responses import ResponsesRequest
from server.response_store import ResponseStore
from server.serving_responses import ServingResponses, chat_messages, stored_items, to_chat
from tests.server.chat_chunks import chunk

pytestmark = pytest.mark.timeout(10)


def request(**kw) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", **kw})


def test_items_with_and_without_type_become_chat_messages() -> None:
    req = request(instructions="be brief", input=[
        {"role": "user", "content": "hi"},  # no type, as openai-agents sends
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "let me check"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"a\":1}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": "two"},
    ])  # fmt: skip
    items = stored_items(req)
    kinds = ["message", "message", "function_call", "function_call", "reasoning",
             "function_call_output", "function_call_output"]  # fmt: skip
    assert [it["type"] for it in items] == kinds
    assert len({it["id"] for it in items}) == 7 and items[4]["id"] == "rs_1"
    assert chat_messages(items) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "let me check", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"a\":1}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]  # fmt: skip
    chat = to_chat(req, items)
    assert chat.messages[0].to_template() == {"role": "system", "content": "be brief"}
    assert len(chat.messages) == 5


def test_tools_choice_format_and_sampling() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = request(input="x", tools=[{"type": "function", "name": "f", "parameters": schema,
                                     "strict": True}],
                  tool_choice={"type": "function", "name": "f"}, parallel_tool_calls=False,
                  max_output_tokens=7, temperature=0.2, top_p=0.5, user="u", stream=True,
                  text={"format": {"type": "json_schema", "name": "n",
                                   "schema": schema}})  # fmt: skip
    chat = to_chat(req, stored_items(req))
    assert chat.tool_mode == "named" and chat.parallel_tool_calls is False
    assert chat.tools[0].function.strict is True
    spec = {"name": "n", "schema": schema, "strict": None}
    assert chat.response_format == {"type": "json_schema", "json_schema": spec}
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.user) == (7, 0.2, 0.5, "u")
    assert chat.include_usage
    plain = to_chat(request(input="x", text={"format": {"type": "json_object"}}), [])
    assert plain.response_format == {"type": "json_object"} and plain.tools is None


async def events_of(chunks: list, fail: bool = False) -> list[tuple[str, dict]]:
    async def gen():
        for c in chunks:
            yield c
        if fail:
            raise RuntimeError("engine fell over")

    serving = ServingResponses(chat=None, store=ResponseStore(10, 10**6))
    req = request(input="x", stream=True)
    base = serving._base(req)
    out = [e async for e in serving._events(base, gen(), "", stored_items(req), req)]
    return out, serving.store


@pytest.mark.timeout(10)
async def test_stream_of_text_then_a_call_in_order_and_stored() -> None:
    events, store = await events_of([
        chunk(content="Hi"), chunk(content=" there"), chunk(call=("call_1", "f", "")),
        chunk(call=(None, None, '{"a":')), chunk(call=(None, None, "1}")),
        chunk(finish="tool_calls"), chunk(usage=(10, 5, 4)),
    ])  # fmt: skip
    assert [name for name, _ in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert [d["sequence_number"] for _, d in events] == list(range(15))
    assert events[6][1]["text"] == "Hi there" and events[12][1]["arguments"] == '{"a":1}'
    assert [d.get("output_index") for _, d in events[2:14]] == [0] * 7 + [1] * 5
    final = events[-1][1]["response"]
    assert final["status"] == "completed"
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][1]["call_id"] == "call_1"
    assert final["usage"]["input_tokens_details"] == {"cached_tokens": 4}
    assert (final["usage"]["input_tokens"], final["usage"]["output_tokens"]) == (10, 5)
    assert store.get(final["id"], "").response == final


@pytest.mark.timeout(10)
async def test_an_error_mid_stream_ends_it_as_failed_and_unstored() -> None:
    events, store = await events_of([chunk(content="Hi")], fail=True)
    name, data = events[-1]
    assert name == "response.failed" and data["sequence_number"] == len(events) - 1
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"] == {
        "code": "server_error", "message": "internal server error: RuntimeError"}  # fmt: skip
    assert len(store) == 0


@pytest.mark.timeout(10)
async def test_nothing_generated_is_one_empty_message_and_length_is_incomplete() -> None:
    events, _ = await events_of([chunk(finish="length"), chunk(usage=(3, 1, 0))])
    final = events[-1][1]["response"]
    assert events[-1][0] == "response.incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["content"][0]["text"] == ""
