"""/v1/chat/completions with --reasoning-parser and --tool-call-parser, in process: each
family's real template, and its golden reply sent one character (one token) per step by a
scripted engine; whole and streamed answers must agree, and the engine gets the right grammar."""

from __future__ import annotations

import json
from typing import Any

import pytest
from parser_cases import WEATHER
from scripted_engine import serving

from server.errors import APIError
from server.flags import configs, make_parser
from server.protocol.chat import ChatCompletionRequest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf)


USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PARIS = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
ROME = {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}

# (template, reasoning parser, tool parser, golden reply, reasoning, content, calls)
CASES = [
    ("qwen3", "qwen3", "hermes", '<think>\nThe user wants the weather.\n</think>\n\n<tool_call>'
     '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "The user wants the weather.", None, [PARIS]),
    ("qwen3", "qwen3", "hermes", "<think>\nNo tool needed.\n</think>\n\nIt is sunny.",
     "No tool needed.", "It is sunny.", []),
    ("qwen2_5", None, "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Rome", "days": 2}}\n</tool_call>', None, None, [PARIS, ROME]),
    ("llama3_1", None, "llama3_json",
     '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, None, [PARIS]),
    ("llama3_1", None, "llama3_json", "It is sunny in Paris.", None, "It is sunny in Paris.", []),
    ("mistral", None, "mistral", 'Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": '
     '{"city": "Paris"}}]', None, "Sure.", [PARIS]),
    ("qwen3_coder", None, "qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>"
     "\nRome\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
     None, None, [ROME]),
    ("deepseek_r1", "deepseek_r1", None, 'I should call the tool.\n</think>\n\n<tool_call>'
     '{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     "I should call the tool.", None, [PARIS]),  # tokenmill's own format, by its preamble
    ("deepseek_r1", "deepseek_r1", None, "Easy.\n</think>\n\nSunny.", "Easy.", "Sunny.", []),
    ("deepseek_r1", "deepseek_r1", "deepseek_v3", "Weather: a tool.\n</think>\n\n"
     "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
     '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Weather: a tool.", None,
     [PARIS]),
]  # fmt: skip


def _flags(reasoning: str | None, tools: str | None) -> dict[str, Any]:
    return {"reasoning_parser": reasoning, "tool_call_parser": tools,
            "enable_auto_tool_choice": tools is not None}  # fmt: skip


async def _chunks(it: Any) -> list[dict]:
    return [c.model_dump() async for c in it]


def _join(chunks: list[dict]) -> dict:
    """A streamed answer's message, from its deltas (arguments joined per call index)."""
    reasoning, reasoning_content, content, calls, finish = "", "", "", {}, None
    for chunk in chunks:
        for choice in chunk["choices"]:
            d = choice["delta"]
            reasoning += d.get("reasoning") or ""
            reasoning_content += d.get("reasoning_content") or ""
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                if "id" in tc:
                    assert tc["index"] not in calls and tc["function"]["arguments"] == ""
                    calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
                calls[tc["index"]]["arguments"] += tc["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    assert reasoning == reasoning_content
    return {"reasoning": reasoning or None, "content": content.strip() or None,
            "calls": [calls[i] for i in sorted(calls)], "finish": finish}  # fmt: skip


@pytest.mark.parametrize("tmpl,reasoning,tools,reply,thought,content,calls", CASES)
async def test_golden_replies_whole_and_streamed(
    tokenizer, tmpl, reasoning, tools, reply, thought, content, calls
):
    chat, engine = serving(tokenizer, reply, tmpl, **_flags(reasoning, tools))
    body = {"messages": USER, "tools": [WEATHER], "temperature": 0}
    whole = (await chat.create(ChatCompletionRequest(**body))).model_dump()
    message, finish = whole["choices"][0]["message"], whole["choices"][0]["finish_reason"]
    got = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
           for c in message.get("tool_calls", [])]  # fmt: skip
    assert (message.get("reasoning"), message["content"], got) == (thought, content, calls)
    assert message.get("reasoning_content") == thought
    assert finish == ("tool_calls" if calls else "stop")
    assert whole["usage"]["completion_tokens"] == len(reply)  # reasoning tokens count too
    stream = ChatCompletionRequest(**body, stream=True, stream_options={"include_usage": True})
    chunks = await _chunks(await chat.create(stream))
    assert _join(chunks) == {"reasoning": thought, "content": content, "calls": calls,
                             "finish": finish}  # fmt: skip
    assert chunks[-1]["usage"]["completion_tokens"] == len(reply)
    for chunk in chunks:  # no markup ever leaks into content
        for choice in chunk["choices"]:
            text = (choice["delta"].get("content") or "") + (choice["delta"].get("reasoning") or "")
            markup = ("<tool_call", "</think", "[TOOL_CALLS", "<function", "<｜tool")
            assert not any(t in text for t in markup)
    prompt, params = engine.requests[0]
    assert params.skip_special_tokens is (tools not in ("mistral", "llama3_json", "deepseek_v3"))
    if reasoning is not None and params.structured_outputs is not None:  # auto's call grammar
        assert "think_text[lazy]" in params.structured_outputs.spec


async def test_grammars_start_after_the_reasoning_and_not_when_thinking_is_off(tokenizer):
    """R1's prompt opens the reasoning: the grammar waits for `</think>`; Qwen3 with
    enable_thinking false has it closed in the prompt: the user's schema as given."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    chat, engine = serving(
        tokenizer, 'Hm.</think>{"a": 1}', "deepseek_r1", reasoning_parser="deepseek_r1"
    )
    whole = await chat.create(ChatCompletionRequest(messages=USER, response_format=rf))
    assert whole.choices[0].message.content == '{"a": 1}'
    so = engine.requests[0][1].structured_outputs
    assert (so.kind, so.param) == ("grammar", "response_format")
    assert so.spec.splitlines()[1] == "start: think body" and '"properties"' in so.spec
    chat, engine = serving(tokenizer, '{"a": 1}', "qwen3", reasoning_parser="qwen3")
    kwargs = {"enable_thinking": False}
    req = ChatCompletionRequest(messages=USER, response_format=rf, chat_template_kwargs=kwargs)
    whole = await chat.create(req)
    assert (whole.choices[0].message.content, whole.choices[0].message.reasoning) == (
        '{"a": 1}',
        None,
    )
    prompt, params = engine.requests[0]
    assert tokenizer.decode(prompt, False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert (params.structured_outputs.kind, json.loads(params.structured_outputs.spec)) == (
        "json",
        schema,
    )


async def test_required_and_named_use_the_native_grammar(tokenizer):
    chat, engine = serving(
        tokenizer,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "mistral",
        **_flags(None, "mistral"),
    )
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        req = ChatCompletionRequest(messages=USER, tools=[WEATHER], tool_choice=choice)
        whole = await chat.create(req)
        assert whole.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    specs = [p.structured_outputs.spec for _, p in engine.requests]
    assert all("open_tag calls" in s and '"[TOOL_CALLS]"' in s for s in specs)
    assert '"maxItems": 1' in specs[1] and '"maxItems"' not in specs[0]
    unknown = {"type": "function", "function": {"name": "nope"}}
    err = await chat.create(
        ChatCompletionRequest(messages=USER, tools=[WEATHER], tool_choice=unknown)
    )
    assert (err.status_code, err.param) == (400, "tool_choice") and "'nope'" in err.message


async def test_auto_needs_enable_auto_tool_choice_with_a_parser(tokenizer):
    chat, _ = serving(tokenizer, "x", "qwen2_5", tool_call_parser="hermes")
    err = await chat.create(ChatCompletionRequest(messages=USER, tools=[WEATHER]))
    assert isinstance(err, APIError) and (err.status_code, err.param) == (400, "tool_choice")
    assert "--enable-auto-tool-choice" in err.message


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
async def test_earlier_reasoning_and_calls_render_through_the_template(tokenizer, key):
    """Interleaved thinking: an assistant turn's reasoning (either name), its call and the tool
    result reach Qwen3's own template, which writes them back in the model's format."""
    chat, engine = serving(tokenizer, "Sunny.", "qwen3", **_flags("qwen3", "hermes"))
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages = [*USER, {"role": "assistant", "content": None, key: "I need the weather.",
                        "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]  # fmt: skip
    await chat.create(ChatCompletionRequest(messages=messages, tools=[WEATHER]))
    text = tokenizer.decode(engine.requests[0][0], False)
    assert text.endswith(
        "<|im_start|>assistant\n<think>\nI need the weather.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )


def test_flags():
    args = make_parser().parse_args(["serve", "--reasoning-parser", "qwen3", "--tool-call-parser",
                                     "hermes", "--enable-auto-tool-choice"])  # fmt: skip
    server = configs(args)[1]
    assert (server.reasoning_parser, server.tool_call_parser, server.enable_auto_tool_choice) == (
        "qwen3",
        "hermes",
        True,
    )
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        configs(make_parser().parse_args(["serve", "--enable-auto-tool-choice"]))
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--reasoning-parser", "nope"])


async def test_a_reasoning_parser_with_special_tags_keeps_special_tokens(tokenizer):
    """Magistral's [THINK] tags are special tokens: the detokenizer must not drop them."""
    chat, engine = serving(tokenizer, "[THINK]Easy.[/THINK]Sunny.", "mistral",
                           reasoning_parser="mistral")  # fmt: skip
    whole = await chat.create(ChatCompletionRequest(messages=USER))
    message = whole.choices[0].message
    assert (message.reasoning, message.reasoning_content, message.content) == (
        "Easy.",
        "Easy.",
        "Sunny.",
    )
    assert engine.requests[0][1].skip_special_tokens is False


async def test_continue_final_message_inside_the_reasoning(tokenizer):
    """A reply that goes on from an unclosed `<think>` starts in the reasoning."""
    chat, engine = serving(
        tokenizer, " says hi.\n</think>\n\nHello!", "qwen3", reasoning_parser="qwen3"
    )
    messages = [*USER, {"role": "assistant", "content": "<think>\nThe user"}]
    req = ChatCompletionRequest(
        messages=messages, continue_final_message=True, add_generation_prompt=False
    )
    message = (await chat.create(req)).choices[0].message
    assert (message.reasoning, message.content) == ("says hi.", "Hello!")
    assert tokenizer.decode(engine.requests[0][0], False).endswith("<think>\nThe user")


async def test_deepseek_template_gets_earlier_arguments_as_text(tokenizer):
    """DeepSeek's template joins `arguments` to strings: the objects other templates want fail
    there, so the history is rendered again with the arguments as JSON text."""
    chat, engine = serving(tokenizer, "Done.\n</think>\n\nSunny.", "deepseek_r1",
                           **_flags("deepseek_r1", "deepseek_v3"))  # fmt: skip
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]  # fmt: skip
    whole = await chat.create(ChatCompletionRequest(messages=messages, tools=[WEATHER]))
    assert whole.choices[0].message.content == "Sunny."
    assert tokenizer.decode(engine.requests[0][0], False).endswith(
        "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
        "<｜end▁of▁sentence｜>"
        '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜>'
        "<｜tool▁outputs▁end｜>"
    )
