"""Tool-call parsing (whole and streamed), the call grammar, request fields → one constraint."""

from __future__ import annotations

import json

import pytest

from model.sampling_params import SamplingParamsError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.tool_calls import ToolCallStreamer, parse_tool_calls, tool_call_constraint

pytestmark = pytest.mark.timeout(30)

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'


def test_parse_text_and_calls():
    assert parse_tool_calls("hello") == ("hello", [])
    content, calls = parse_tool_calls(f"Sure.\n{CALL}\n{CALL}")
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"a": 1}),
        ("f", {"a": 1}),
    ]
    assert calls[0].id != calls[1].id
    content, calls = parse_tool_calls("<tool_call>not json</tool_call>")
    assert calls == [] and content == "<tool_call>not json</tool_call>"


def test_streamer_holds_back_a_partial_tag_and_matches_whole_parse():
    text = f"a <tool_x> b {CALL} c"
    whole = parse_tool_calls(text)
    for size in (1, 3, 7):
        s = ToolCallStreamer()
        content, calls = "", []
        for i in range(0, len(text), size):
            c, k = s.feed(text[i : i + size])
            assert "<tool_call" not in c
            content, calls = content + c, calls + k
        c, k = s.flush()
        content, calls = content + c, calls + k
        assert content.strip() == whole[0].replace("\n", "")
        assert [(x.name, x.arguments) for x in calls] == [(x.name, x.arguments) for x in whole[1]]
        assert s.num_calls == 1


def test_call_grammar_named_and_unknown_name():
    spec = tool_call_constraint([TOOL], None, parallel=True)
    assert spec.kind == "grammar" and "start: call+" in spec.spec and "%json" in spec.spec
    assert "start: call\n" in tool_call_constraint([TOOL], "f", parallel=True).spec
    with pytest.raises(SamplingParamsError, match="'g'") as e:
        tool_call_constraint([TOOL], "g", parallel=True)
    assert e.value.param == "tool_choice"


def test_request_fields_to_one_constraint():
    chat = {"messages": [{"role": "user", "content": "x"}]}
    req = ChatCompletionRequest(
        **chat, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}
    )
    so = req.to_sampling_params().structured_outputs
    assert (so.kind, so.spec, so.param) == ("json", "{}", "response_format")
    req = CompletionRequest(prompt="x", structured_outputs={"choice": ["a", "b"]})
    assert req.to_sampling_params().structured_outputs.kind == "choice"
    req = CompletionRequest(prompt="x", guided_json='{"type": "object"}')
    assert req.to_sampling_params().structured_outputs.param == "guided_json"
    assert ChatCompletionRequest(**chat, response_format={"type": "text"}).structured() is None
    with pytest.raises(SamplingParamsError, match="only one"):
        CompletionRequest(prompt="x", guided_regex="a", guided_choice=["b"]).to_sampling_params()
    with pytest.raises(SamplingParamsError, match="tool_choice needs tools"):
        ChatCompletionRequest(**chat, tool_choice="required").to_sampling_params()
    req = ChatCompletionRequest(**chat, tools=[TOOL], tool_choice="required")
    assert req.tool_mode == "required"
    assert ChatCompletionRequest(**chat, tools=[TOOL], tool_choice="none").tool_mode == "none"
