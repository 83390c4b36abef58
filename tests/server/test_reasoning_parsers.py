"""Reasoning parsers: golden replies split whole and in 1-character chunks, where the prompt
leaves the reply (the real templates' generation prompts), and grammars after the reasoning."""

from __future__ import annotations

import pytest
from parser_cases import template

from scheduler import StructuredOutputsParams
from server.reasoning import REASONING_PARSERS, ReasoningDelta

pytestmark = pytest.mark.timeout(60)

QWEN3 = REASONING_PARSERS["qwen3"]()
R1 = REASONING_PARSERS["deepseek_r1"]()
MAGISTRAL = REASONING_PARSERS["mistral"]()

# (parser, in_reasoning, model output, reasoning, content)
GOLDEN = [
    (QWEN3, None, "<think>\nThe user says hi.\n</think>\n\nHello! How can I help?",
     "The user says hi.", "Hello! How can I help?"),
    (QWEN3, None, "Hello! No thinking here.", None, "Hello! No thinking here."),
    (QWEN3, False, "<think>x</think>y", None, "<think>x</think>y"),  # enable_thinking false
    (QWEN3, True, "Still thinking\n</think>\n\nDone.", "Still thinking", "Done."),  # 2507
    (QWEN3, None, "<think>\nCut off at max_tokens", "Cut off at max_tokens", None),
    (QWEN3, None, "<think>\n\n</think>\n\n2 + 2 = 4.", None, "2 + 2 = 4."),
    (QWEN3, None, "<think>a </thin b < /think></think>c", "a </thin b < /think>", "c"),
    (R1, True, "Okay, 2 + 2.\n</think>\n\nThe answer is **4**.", "Okay, 2 + 2.",
     "The answer is **4**."),
    (R1, True, "<think>\nOld templates: the model opens it.\n</think>\nOK",
     "Old templates: the model opens it.", "OK"),
    (R1, True, "No end tag: all reasoning.", "No end tag: all reasoning.", None),
    (R1, False, "An answer after a closed think.", None, "An answer after a closed think."),
    (MAGISTRAL, None, "[THINK]Two plus two.[/THINK]4", "Two plus two.", "4"),
    (MAGISTRAL, None, "<think>not its tags</think>", None, "<think>not its tags</think>"),
]  # fmt: skip


@pytest.mark.parametrize("parser,in_reasoning,text,reasoning,content", GOLDEN)
@pytest.mark.parametrize("size", [0, 1, 3])
def test_golden_whole_and_streamed(parser, in_reasoning, text, reasoning, content, size):
    """size 0: the whole reply; else streamed in `size`-character deltas, joined."""
    if size == 0:
        assert parser.parse(text, in_reasoning) == (reasoning, content)
        return
    s = parser.streamer(in_reasoning)
    deltas = [s.feed(text[i : i + size]) for i in range(0, len(text), size)] + [s.flush()]
    assert "".join(d.reasoning for d in deltas) == (reasoning or "")
    assert "".join(d.content for d in deltas) == (content or "")
    if size == 1:  # no tag text ever leaks into a delta
        assert not any("</think" in d.reasoning or "</think" in d.content for d in deltas[:-1])


def test_reasoning_streams_before_the_end_tag_arrives():
    s = R1.streamer(True)
    assert s.feed("Let me") == ReasoningDelta("Let me", "")
    assert s.feed(" see") == ReasoningDelta(" see", "")
    assert s.feed(" </th") == ReasoningDelta("", "")  # the space may end the reasoning: held
    assert s.in_reasoning
    assert s.feed("ink>\n\nIt") == ReasoningDelta("", "It") and not s.in_reasoning
    assert s.feed(" is") == ReasoningDelta("", " is") and s.flush() == ReasoningDelta("", "")


def test_a_continued_assistant_message_says_where_the_reply_starts():
    """continue_final_message: an unclosed `<think>` in the text continued means reasoning,
    a closed one content; without tags the prompt's tail decides as usual."""
    assert QWEN3.starts_in_reasoning("x", "<think>\nThe user asks") is True
    assert QWEN3.starts_in_reasoning("x", "<think>a</think>\n\nThe answer") is False
    assert R1.starts_in_reasoning("x", "Hmm, a </think> then more") is False
    assert QWEN3.starts_in_reasoning("<think>\n", "plain") is True
    assert QWEN3.starts_in_reasoning("x", "we <think> then </think> then <think>") is True


def test_glm45_and_deepseek_v3_read_the_prompt_as_qwen3_does():
    """DeepSeek-V3.1's template opens `<think>` with thinking on and closes it with it off."""
    for name in ("glm45", "deepseek_v3"):
        p = REASONING_PARSERS[name]()
        assert p.starts_in_reasoning("<｜Assistant｜><think>") is True
        assert p.starts_in_reasoning("<｜Assistant｜></think>") is False
        assert p.starts_in_reasoning("<|assistant|>") is None
        assert p.parse("<think>a</think>b", None) == ("a", "b")
    assert MAGISTRAL.keep_special_tokens and not QWEN3.keep_special_tokens


def _tail(tok, name: str, **kwargs) -> str:
    msgs = [{"role": "user", "content": "Hi"}]
    return tok.apply_chat_template(
        msgs, chat_template=template(name), tokenize=False, add_generation_prompt=True, **kwargs
    )


def test_where_the_real_templates_leave_the_reply(smollm2_gguf):
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf).hf
    assert QWEN3.starts_in_reasoning(_tail(tok, "qwen3")) is None  # the model opens it
    assert QWEN3.starts_in_reasoning(_tail(tok, "qwen3", enable_thinking=False)) is False
    assert _tail(tok, "qwen3", enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    assert _tail(tok, "deepseek_r1").endswith("<｜Assistant｜><think>\n")
    assert R1.starts_in_reasoning(_tail(tok, "deepseek_r1")) is True
    assert R1.starts_in_reasoning("<|im_start|>assistant\n") is True  # R1 thinks anyway


SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'


def _walk(compiler, tok, spec, text: str) -> tuple[int, int, bool]:
    """(tokens accepted, tokens in `text`, EOS allowed at the end) for a fresh matcher."""
    m = compiler.matcher(spec)
    ids = tok.encode(text, add_special_tokens=False)
    for n, t in enumerate(ids):
        if not m.accept(t):
            return n, len(ids), False
    return len(ids), len(ids), m.ll.is_accepting()


def test_constraints_apply_from_the_end_of_the_reasoning(smollm2_gguf):
    """The wrapped grammar lets anything through up to `</think>` (JSON-looking text too), then
    only the user's constraint, whatever its kind; a closed reasoning leaves the spec as is."""
    from model.constraints import ConstraintCompiler
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    compiler = ConstraintCompiler(tok.hf, 49152, tok.eos_token_ids)

    def walk(spec, text):
        n, total, ok = _walk(compiler, tok, spec, text)
        return n == total, ok

    try:
        js = StructuredOutputsParams("json", SCHEMA, "response_format")
        assert R1.constraint(js, False) is js
        wrapped = R1.constraint(js, True)
        assert (wrapped.kind, wrapped.param) == ("grammar", "response_format")
        assert walk(wrapped, 'Say {"a": "x"} first.\n</think>\n{"a":1}') == (False, False)
        assert walk(wrapped, 'Say {"a": "x"} first.\n</think>{"a":1}') == (True, True)
        assert walk(wrapped, '{"a":1}') == (True, False)  # still reasoning: no end yet
        assert walk(wrapped, "Hmm</think>Sure!") == (False, False)
        optional = QWEN3.constraint(js, None)  # Qwen3 may or may not open a think block
        assert walk(optional, '{"a":1}') == (True, True)
        assert walk(optional, '<think>\n{"a": no}\n</think>{"a":1}') == (True, True)
        for kind, spec, good, bad in [
            ("regex", "a/b+", "a/bb", "ab"),
            ("choice", '["yes", "no"]', "no", "maybe"),
            ("grammar", 'start: "x" y\ny: "!"', "x!", "x?"),
            ("grammar", 'root ::= "x" "!"', "x!", "x?"),  # GBNF
            ("json_object", "", "{}", "[]"),
        ]:
            spec = R1.constraint(StructuredOutputsParams(kind, spec), True)
            assert walk(spec, f"think </think>{good}") == (True, True), kind
            assert walk(spec, f"think </think>{bad}")[0] is False, kind
    finally:
        compiler.shutdown()
