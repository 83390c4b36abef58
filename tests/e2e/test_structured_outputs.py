"""Structured outputs and tool calls from the default SmolLM2-135M: valid every time, by grammar."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.structured_schemas import SCHEMAS

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string", "maxLength": 20}},
            "required": ["tz"],
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(launch_server, smollm2_gguf: str):
    return launch_server(["--log-level", "warning"])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=150)


def _json_request(i: int, desc: str, schema: dict, temperature: float) -> dict:
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Describe {desc} as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
        },
        temperature=temperature,
        seed=i,
        max_tokens=200,
    )


@pytest.mark.timeout(300)
def test_32_schemas_greedy_and_sampled_all_validate(server):
    """64 concurrent requests (32 schemas x greedy, sampled) against one server."""

    async def main() -> list:
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=280
        )
        reqs = [
            _json_request(i, desc, schema, temp)
            for temp in (0.0, 1.0)
            for i, (desc, schema) in enumerate(SCHEMAS)
        ]
        try:
            return await asyncio.gather(*(aclient.chat.completions.create(**r) for r in reqs))
        finally:
            await aclient.close()

    replies = asyncio.run(main())
    assert len(replies) == 2 * len(SCHEMAS) >= 64
    for k, reply in enumerate(replies):
        desc, schema = SCHEMAS[k % len(SCHEMAS)]
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (desc, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.timeout(180)
def test_parse_with_pydantic_and_stream_equals_non_stream(server, client):
    class Person(BaseModel):
        name: str
        age: int

    messages = [{"role": "user", "content": "Give me a person as JSON with name and age."}]
    parsed = client.chat.completions.parse(
        model=MODEL, messages=messages, response_format=Person, temperature=0, max_tokens=60
    )
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name
    rf = {"type": "json_object"}
    kw = dict(model=MODEL, messages=messages, response_format=rf, temperature=0, max_tokens=100)
    full, chunks = run_all(server, [("chat", kw), ("chat", dict(kw, stream=True))])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert isinstance(json.loads(text), dict)


def run_all(server, calls: list) -> list:
    """Send every (method path, kwargs) at once with the async SDK; results in order."""

    async def main() -> list:
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=280
        )
        try:
            jobs = []
            for kind, kw in calls:
                api = aclient.completions if kind == "completions" else aclient.chat.completions
                jobs.append(_collect(api.create(**kw)) if kw.get("stream") else api.create(**kw))
            return await asyncio.gather(*jobs)
        finally:
            await aclient.close()

    return asyncio.run(main())


async def _collect(stream_coro) -> list:
    return [chunk async for chunk in await stream_coro]


GRAMMAR = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["x"],
    "additionalProperties": False,
}


@pytest.mark.timeout(240)
def test_regex_choice_grammar_on_both_endpoints(server):
    calls = []
    for t in (0.0, 1.0):
        common = dict(model=MODEL, temperature=t, seed=3)
        calls += [
            ("completions", dict(common, prompt="My phone number is", max_tokens=20,
                                 extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"})),
            ("chat", dict(common, messages=[{"role": "user", "content": "Is the sky blue?"}], n=2,
                          extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})),
            ("completions", dict(common, prompt="A JSON point:", max_tokens=40,
                                 extra_body={"guided_json": POINT})),
            ("chat", dict(common, messages=[{"role": "user", "content": "Numbers in brackets."}],
                          max_tokens=40, extra_body={"guided_grammar": GRAMMAR})),
        ]  # fmt: skip
    replies = run_all(server, calls)
    for k in (0, 4):
        phone, choice, point, grammar = replies[k : k + 4]
        assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.choices[0].text)
        assert phone.choices[0].finish_reason == "stop"
        assert all(c.message.content in ("yes", "no", "maybe") for c in choice.choices)
        jsonschema.validate(json.loads(point.choices[0].text), POINT)
        text = grammar.choices[0].message.content
        assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", text), text


PROMPTS = [
    "What is the weather in Paris?",
    "Tell me the weather in Tokyo in fahrenheit.",
    "What time is it in Berlin?",
    "I need the time in UTC.",
]


def _check_calls(message, names: set[str]) -> list[tuple[str, str]]:
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        out.append((call.function.name, call.function.arguments))
    return out


def _streamed_calls(chunks: list) -> tuple[list[tuple[str, str]], str | None]:
    """Join streamed tool-call deltas: id and name must come first, then argument pieces."""
    acc: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                slot = acc.setdefault(d.index, {"name": None, "args": ""})
                if d.id is not None:
                    assert slot["name"] is None and d.function.name
                    slot["name"] = d.function.name
                slot["args"] += d.function.arguments or ""
    return [(s["name"], s["args"]) for _, s in sorted(acc.items())], finish


@pytest.mark.timeout(240)
def test_tool_calls_required_and_named_validate_stream_equal(server):
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, expect = [], []
    for tool_choice, names in (("required", set(PARAMS)), (named, {"get_time"})):
        for t in (0.0, 1.0):
            for prompt in PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                          temperature=t, seed=7, max_tokens=80)  # fmt: skip
                calls.append(("chat", kw))
                expect.append((names, None))
                if t == 0.0:
                    calls.append(("chat", dict(kw, stream=True)))
                    expect.append((names, len(calls) - 2))  # equals the reply just before
    replies = run_all(server, calls)
    for reply, (names, same_as) in zip(replies, expect, strict=True):
        if same_as is None:
            assert reply.choices[0].finish_reason == "tool_calls"
            _check_calls(reply.choices[0].message, names)
        else:
            got, finish = _streamed_calls(reply)
            assert finish == "tool_calls"
            assert got == _check_calls(replies[same_as].choices[0].message, names)


@pytest.mark.timeout(120)
def test_tool_history_renders_and_auto_answers(server):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}',
                    },
                }
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    auto, none = run_all(
        server,
        [
            ("chat", dict(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                          max_tokens=30)),
            ("chat", dict(model=MODEL, messages=messages[:1], tools=TOOLS, tool_choice="none",
                          temperature=0, max_tokens=20)),
        ],
    )  # fmt: skip
    choice = auto.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls", "length")
    if choice.message.tool_calls:
        _check_calls(choice.message, set(PARAMS))
    else:
        assert choice.message.content
    assert none.choices[0].message.tool_calls is None  # tool_choice none: text, no calls parsed


@pytest.mark.timeout(120)
def test_bad_constraints_are_400s_naming_the_field(server, client):
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=60)

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    cases = [
        ("/v1/completions", {"prompt": "x", "guided_regex": "[a-"}, "guided_regex", "regex"),
        ("/v1/chat/completions", {**chat, "guided_choice": []}, "guided_choice", "list"),
        (
            "/v1/chat/completions",
            {**chat, "guided_grammar": "start: undefined_rule"},
            "guided_grammar",
            "grammar",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {
                **chat,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                },
            },
            "response_format",
            "uniqueItems",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {**chat, "response_format": {"type": "xml"}},
            "response_format",
            "xml",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {
                **chat,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
            "nope",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {**chat, "guided_regex": "a", "guided_choice": ["b"]},
            "guided_choice",
            "only one",
        ),  # fmt: skip
        (
            "/v1/chat/completions",
            {**chat, "structured_outputs": {"json": "{not json"}},
            "structured_outputs",
            "JSON",
        ),  # fmt: skip
    ]
    for path, body, param, words in cases:
        r = post(path, body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (body, err)
    # the server is unharmed: a normal request right after still works
    ok = client.chat.completions.create(model=MODEL, messages=chat["messages"], max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")
