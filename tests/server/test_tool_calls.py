"""Tool-call parsing (whole and streamed), the call grammar, request fields → one constraint."""

from __future__ import annotations

import pytest

from model.sampling_params import SamplingParamsError
from server.constraints import structured_outputs, tool_call_constraint
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.tool_calls import (
    CALL_CLOSE,
    CALL_OPEN,
    ToolCallDelta,
    ToolCallStreamer,
    parse_tool_calls,
)

pytestmark = pytest.mark.timeout(30)

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'


def test_parse_text_and_calls():
    assert parse_tool_calls("hello") == ("hello", [])
    content, calls = parse_tool_calls(f"Sure.\n{CALL}\n{CALL}")
    assert content == "Sure." and [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')] * 2
    assert calls[0].id != calls[1].id
    content, calls = parse_tool_calls("<tool_call>not json</tool_call>")
    assert calls == [] and content == "<tool_call>not json</tool_call>"
    # another shape (arguments first, or as a string) still parses, whole at the end
    odd = '<tool_call>{"arguments": "{}", "name": "g"}</tool_call>'
    assert [(c.name, c.arguments) for c in parse_tool_calls(odd)[1]] == [("g", "{}")]


def _stream(text: str, size: int) -> tuple[str, list[ToolCallDelta]]:
    s = ToolCallStreamer()
    events = []
    for i in range(0, len(text), size):
        events += s.feed(text[i : i + size])
    events += s.flush()
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if not isinstance(e, str)]


def test_streamer_sends_id_and_name_first_then_arguments_in_pieces():
    text = f'a <tool_x> b {CALL}<tool_call>{{"name":"g","arguments":{{"s":"}}\\"{{"}}}}</tool_call>'
    whole_content, whole = parse_tool_calls(text)
    assert whole_content == "a <tool_x> b"
    assert [(c.name, c.arguments) for c in whole] == [("f", '{"a": 1}'), ("g", '{"s":"}\\"{"}')]
    for size in (1, 3, 7, len(text)):
        content, deltas = _stream(text, size)
        assert "<tool_call" not in content and content.strip() == whole_content
        heads = [d for d in deltas if d.id is not None]
        assert [(d.index, d.name, d.arguments) for d in heads] == [(0, "f", ""), (1, "g", "")]
        for k, call in enumerate(whole):
            pieces = [d.arguments for d in deltas if d.index == k and d.id is None]
            assert "".join(pieces) == call.arguments  # the raw JSON, not the closing brace
            assert deltas.index(heads[k]) < deltas.index(
                next(d for d in deltas if d.index == k and d.id is None)
            )
            if size == 1:
                assert len(pieces) == len(call.arguments)  # one piece per fed character


def test_streamer_cut_short_and_plain_text():
    _, deltas = _stream('<tool_call>{"name": "f", "arguments": {"a": 12', 4)
    assert deltas[0].name == "f" and "".join(d.arguments for d in deltas) == '{"a": 12'
    assert _stream("just text, a < b\n", 2) == ("just text, a < b\n", [])
    assert _stream("<tool_call>oops", 2) == ("<tool_call>oops", [])


def test_call_grammars_required_named_auto_and_unknown_name():
    spec = tool_call_constraint([TOOL], None, parallel=True)
    assert spec.kind == "grammar" and "start: call call*" in spec.spec and "%json" in spec.spec
    assert "start: call\n" in tool_call_constraint([TOOL], "f", parallel=True).spec
    auto = tool_call_constraint([TOOL], None, parallel=False, auto=True, tag_ids=(7, None))
    assert "start: TEXT | head args close\n" in auto.spec and "head_text[lazy]" in auto.spec
    assert "TEXT <[7]>" in auto.spec and "<[7]>" in auto.spec.split("open:")[1]
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
    text = ChatCompletionRequest(**chat, response_format={"type": "text"})
    assert structured_outputs(text) is None
    with pytest.raises(SamplingParamsError, match="only one"):
        CompletionRequest(prompt="x", guided_regex="a", guided_choice=["b"]).to_sampling_params()
    with pytest.raises(SamplingParamsError, match="tool_choice needs tools"):
        ChatCompletionRequest(**chat, tool_choice="required").to_sampling_params()
    req = ChatCompletionRequest(**chat, tools=[TOOL], tool_choice="required")
    assert req.tool_mode == "required"
    assert ChatCompletionRequest(**chat, tools=[TOOL], tool_choice="none").tool_mode == "none"


WEATHER = {
    "type": "function",
    "function": {
        "name": "w",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _walk(compiler, tok, spec, text: str) -> tuple[int, bool]:
    """Feed `text`'s tokens to a fresh matcher: (tokens accepted, EOS allowed at the end)."""
    m = compiler.matcher(spec)
    ids = tok.encode(text, add_special_tokens=False)
    for n, t in enumerate(ids):
        if not m.accept(t):
            return n, False
    return len(ids), m.ll.is_accepting()


def test_auto_grammar_free_text_until_the_tag_then_a_valid_call(smollm2_gguf):
    from model.constraints import ConstraintCompiler
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    compiler = ConstraintCompiler(tok.hf, 49152, tok.eos_token_ids)
    try:
        auto = tool_call_constraint([WEATHER, TOOL], None, parallel=False, auto=True)
        good = '<tool_call>{"name":"w","arguments":{"city":"Rome"}}</tool_call>'

        def n(text: str) -> int:
            return len(tok.encode(text, add_special_tokens=False))

        assert _walk(compiler, tok, auto, "Just text, a < b.\n") == (n("Just text, a < b.\n"), True)
        assert _walk(compiler, tok, auto, f"Let me look. {good}") == (
            n(f"Let me look. {good}"),
            True,
        )
        # once the tag is written only a call to a known tool may follow, and EOS waits for it
        bad = 'Hi <tool_call>{"name":"x"'
        assert _walk(compiler, tok, auto, bad)[0] < n(bad)
        half = '<tool_call>{"name":"w","arguments":{'
        assert _walk(compiler, tok, auto, half) == (n(half), False)
        assert _walk(compiler, tok, auto, good + good)[0] < n(good + good)  # parallel=False
        required = tool_call_constraint([WEATHER, TOOL], None, parallel=True)
        assert _walk(compiler, tok, required, good + good) == (n(good + good), True)
        assert _walk(compiler, tok, required, "Hi")[0] == 0
    finally:
        compiler.shutdown()


def test_auto_grammar_takes_the_tags_as_special_tokens_too(smollm2_gguf):
    """Templates like Qwen's have `<tool_call>` as one added token: the grammar accepts both."""
    from model.constraints import ConstraintCompiler
    from model.tokenizer import load_tokenizer

    hf = load_tokenizer(smollm2_gguf).hf
    hf.add_tokens([CALL_OPEN, CALL_CLOSE])
    open_id, close_id = hf.convert_tokens_to_ids([CALL_OPEN, CALL_CLOSE])
    compiler = ConstraintCompiler(hf, len(hf), [2])
    try:
        spec = tool_call_constraint([WEATHER], None, False, auto=True, tag_ids=(open_id, close_id))
        body = hf.encode('{"name":"w","arguments":{"city":"Rome"}}', add_special_tokens=False)
        ids = [*hf.encode("Hi ", add_special_tokens=False), open_id, *body, close_id]
        m = compiler.matcher(spec)
        assert all(m.accept(t) for t in ids) and m.ll.is_accepting()
        m = compiler.matcher(spec)
        assert m.accept(open_id) and not m.accept(hf.encode("Hi", add_special_tokens=False)[0])
    finally:
        compiler.shutdown()
