"""Tool-call parsers: each family's golden replies whole and in 1-character chunks, the calls
its real chat template writes read back, and its call grammar on the real matcher."""

from __future__ import annotations

import json

import pytest
from parser_cases import WEATHER, joined, stream_events, template

from server.tool_parsers import TOOL_PARSERS

pytestmark = pytest.mark.timeout(60)

PARIS = ("get_weather", '{"city": "Paris"}')
# (parser, model output, content, calls)
GOLDEN = [
    ("hermes", 'I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris"}}\n</tool_call>', "I will check.", [PARIS]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
     '"days": 2}}\n</tool_call>', None, [PARIS, ("get_weather", '{"city": "Rome", "days": 2}')]),
    ("hermes", "It is sunny in <b>Paris</b>.", "It is sunny in <b>Paris</b>.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 1}}', None,
     [PARIS, ("get_weather", '{"city": "Oslo", "days": 1}')]),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", "Paris is sunny {today}.", "Paris is sunny {today}.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     None, [PARIS]),
    ("mistral", 'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}},'
     ' {"name": "get_weather", "arguments": {"city": "Rome"}}]', "Checking.",
     [PARIS, ("get_weather", '{"city": "Rome"}')]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [PARIS]),  # v11+
    ("mistral", "[1, 2] is a [TOOL list", "[1, 2] is a [TOOL list", []),
    ("qwen3_coder", "Let me look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
     "Paris\n</parameter>\n</function>\n</tool_call>", "Let me look.", [PARIS]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork <3\n"
     "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>", None,
     [("get_weather", '{"city": "New\\nYork <3", "days": 3}')]),
    ("qwen3_coder", "Use <tool_call> tags? No.", "Use <tool_call> tags? No.", []),
    ("deepseek_v3", "Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"
     'get_weather\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>'
     'function<｜tool▁sep｜>get_weather\n```json\n{"city": "Rome", "days": 2}\n```'
     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "Checking.",
     [PARIS, ("get_weather", '{"city": "Rome", "days": 2}')]),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
     '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, [PARIS]),  # V3.1
    ("deepseek_v3", "A ```json\n{}``` block.", "A ```json\n{}``` block.", []),
]  # fmt: skip


@pytest.mark.parametrize("name,text,content,calls", GOLDEN)
@pytest.mark.parametrize("size", [0, 1, 3])
def test_golden_whole_and_streamed(name, text, content, calls, size):
    """size 0: the whole reply; else `size`-character deltas: the same calls, no markup in the
    content, each call's id and name before its arguments."""
    parser = TOOL_PARSERS[name]([WEATHER])
    if size == 0:
        got_content, got = parser.parse(text)
        assert (got_content, [(c.name, c.arguments) for c in got]) == (content, calls)
        assert len({c.id for c in got}) == len(got)
        return
    got_content, got = joined(stream_events(parser.streamer(), text, size))
    assert got == calls
    assert got_content.strip() == (content or "")
    for tag in ("<tool_call", "[TOOL_CALLS", "<|python_tag", "<function", "<｜tool"):
        assert tag not in got_content or not calls


def test_mistral_ids_are_what_its_template_takes():
    _, calls = TOOL_PARSERS["mistral"]([WEATHER]).parse(GOLDEN[7][1])
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()


# (parser, template, where the assistant's turn starts, where it ends)
ROUND_TRIP = [
    ("hermes", "qwen2_5", "<|im_start|>assistant", "<|im_end|>"),
    ("hermes", "qwen3", "<|im_start|>assistant", "<|im_end|>"),
    ("llama3_json", "llama3_1", "assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("mistral", "mistral", "[/INST]", "[TOOL_RESULTS]"),
    ("qwen3_coder", "qwen3_coder", "<|im_start|>assistant", "<|im_end|>"),
    ("deepseek_v3", "deepseek_r1", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
]


@pytest.mark.parametrize("name,tmpl,start,end", ROUND_TRIP)
def test_the_calls_each_template_writes_parse_back(smollm2_gguf, name, tmpl, start, end):
    """A model learns its format from its template: what the template writes for an earlier
    call is what the parser must read (streamed the same), and tool results render too."""
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf).hf
    parser = TOOL_PARSERS[name]([WEATHER])
    args = {"city": "Paris", "days": 2}
    # DeepSeek's template joins the arguments as text; the others take the object
    written = json.dumps(args) if tmpl == "deepseek_r1" else args
    call = {"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": written}}  # fmt: skip
    msgs = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "abcDEF123"},
    ]
    text = tok.apply_chat_template(
        msgs, tools=[WEATHER], chat_template=template(tmpl), tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    assert "21" in text.split(end, 1)[1]  # the tool result follows the call
    # the call's turn (Llama's header comes once more, for the generation prompt)
    turn = text.split(start)[-2 if end == "<|eot_id|>" else 1].split(end)[0]
    turn = turn.removesuffix(tok.eos_token or "")
    content, calls = parser.parse(turn)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", args)
    ]
    assert joined(stream_events(parser.streamer(), turn))[1] == [
        (c.name, c.arguments) for c in calls
    ]


def _walk(compiler, tok, spec, text: str) -> tuple[bool, bool]:
    """(every token of `text` accepted, EOS allowed at the end) for a fresh matcher."""
    m = compiler.matcher(spec)
    for t in tok.encode(text, add_special_tokens=False):
        if not m.accept(t):
            return False, False
    return True, m.ll.is_accepting()


GRAMMAR_CASES = [
    ("hermes", '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'),
    ("llama3_json", '{"name":"get_weather","parameters":{"city":"Paris"}}'),
    ("mistral", '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris","days":2}}]'),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n"
     "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"),
    ("deepseek_v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"
     '\n```json\n{"city":"Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
]  # fmt: skip


@pytest.mark.parametrize("name,good", GRAMMAR_CASES)
def test_required_and_auto_grammars_write_the_native_format(smollm2_gguf, name, good):
    """required: only calls in the family's format (its parser reads them back); auto: text,
    then calls after the family's opening tag (llama3_json has none: no grammar)."""
    from model.constraints import ConstraintCompiler
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    compiler = ConstraintCompiler(tok.hf, 49152, tok.eos_token_ids)
    parser = TOOL_PARSERS[name]([WEATHER, {"type": "function", "function": {"name": "noop"}}])
    ids = dict.fromkeys(parser.tags)
    try:
        required = parser.constraint(None, True, False, ids)
        assert _walk(compiler, tok, required, good) == (True, True)
        assert _walk(compiler, tok, required, "Hello " + good)[0] is False
        bad = good.replace("get_weather", "get_time")
        assert _walk(compiler, tok, required, bad)[0] is False
        named = parser.constraint("noop", True, False, ids)
        assert _walk(compiler, tok, named, good)[0] is False
        assert [c.name for c in parser.parse(good)[1]] == ["get_weather"]
        auto = parser.constraint(None, True, True, ids)
        if name == "llama3_json":
            assert auto is None
            return
        assert _walk(compiler, tok, auto, "Sure, a moment. " + good) == (True, True)
        assert _walk(compiler, tok, auto, "Just text.") == (True, True)
    finally:
        compiler.shutdown()
