"""Responses requests → stored items and the chat request they run as (no model)."""

from __future__ import annotations

import pytest

from server.protocol_responses import ResponsesRequest
from server.serving_responses import chat_messages, stored_items, to_chat

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
