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
def server(default_server):
    """The session's default-model server (test_default_model.py's too: one start-up)."""
    return default_server


@pytest.fixture(scope="module")
def replies(server) -> dict[str, list]:
    """Every test's requests sent at once (one server, one busy batch), split back per test."""
    groups = {
        "schemas": _schema_calls(),
        "parse": _parse_calls(),
        "regex": _regex_calls(),
        "tools": _tool_calls()[0],
        "parallel": _parallel_calls(),
    }
    flat = run_all(server, [c for calls in groups.values() for c in calls])
    out, k = {}, 0
    for name, calls in groups.items():
        out[name], k = flat[k : k + len(calls)], k + len(calls)
    return out


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


def _schema_calls() -> list:
    """32 schemas x greedy, sampled."""
    return [
        ("chat", _json_request(i, desc, schema, temp))
        for temp in (0.0, 1.0)
        for i, (desc, schema) in enumerate(SCHEMAS)
    ]


@pytest.mark.timeout(600)
def test_32_schemas_greedy_and_sampled_all_validate(replies):
    """64 requests (32 schemas x greedy, sampled), concurrent with the other tests' requests."""
    got = replies["schemas"]
    assert len(got) == 2 * len(SCHEMAS) >= 64
    for k, reply in enumerate(got):
        desc, schema = SCHEMAS[k % len(SCHEMAS)]
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (desc, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


class Person(BaseModel):
    name: str
    age: int


PERSON = [{"role": "user", "content": "Give me a person as JSON with name and age."}]


def _parse_calls() -> list:
    kw = dict(model=MODEL, messages=PERSON, response_format={"type": "json_object"},
              temperature=0, max_tokens=100)  # fmt: skip
    parse = dict(model=MODEL, messages=PERSON, response_format=Person, temperature=0, max_tokens=60)
    return [("parse", parse), ("chat", kw), ("chat", dict(kw, stream=True))]


@pytest.mark.timeout(600)
def test_parse_with_pydantic_and_stream_equals_non_stream(replies):
    parsed, full, chunks = replies["parse"]
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.name
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert isinstance(json.loads(text), dict)


def run_all(server, calls: list) -> list:
    """Send every (kind, kwargs) at once with the async SDK (kind: chat, completions or parse);
    results in order."""

    async def main() -> list:
        aclient = openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=540
        )
        try:
            jobs = []
            for kind, kw in calls:
                api = aclient.completions if kind == "completions" else aclient.chat.completions
                if kind == "parse":
                    jobs.append(aclient.chat.completions.parse(**kw))
                else:
                    jobs.append(
                        _collect(api.create(**kw)) if kw.get("stream") else api.create(**kw)
                    )
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


def _regex_calls() -> list:
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
    return calls


@pytest.mark.timeout(600)
def test_regex_choice_grammar_on_both_endpoints(replies):
    got = replies["regex"]
    for k in (0, 4):
        phone, choice, point, grammar = got[k : k + 4]
        assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.choices[0].text)
        assert phone.choices[0].finish_reason == "stop"
        assert all(c.message.content in ("yes", "no", "maybe") for c in choice.choices)
        jsonschema.validate(json.loads(point.choices[0].text), POINT)
        text = grammar.choices[0].message.content
        if grammar.choices[0].finish_reason == "length":  # a long list: the grammar's prefix
            assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*,?", text), text
        else:
            assert re.fullmatch(r"\([0-9]{1,2}(,[0-9]{1,2})*\)", text), text


PROMPTS = [
    "What is the weather in Paris?",
    "Tell me the weather in Tokyo in fahrenheit.",
    "What time is it in Berlin?",
    "I need the time in UTC.",
]


# a history in which the assistant called a tool once: "auto" then calls for a similar question
HISTORY = [
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
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]
# after HISTORY, greedy SmolLM2 calls get_weather for the first two and answers the others in text
AUTO_PROMPTS = [
    "What is the weather in Tokyo?",
    "What is the weather in Rome?",
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


def _streamed_calls(chunks: list) -> tuple[list[tuple[str, str]], str | None, list[int]]:
    """Join streamed tool-call deltas (id and name must come first, then argument pieces): the
    calls, the finish reason, and per call the number of tokens (logprob chunks) during which
    its arguments arrived: more than one when they stream as the tokens come."""
    acc: dict[int, dict] = {}
    finish, num_tokens = None, 0
    for chunk in chunks:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            num_tokens += bool(c.logprobs and c.logprobs.content)
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    assert d.index not in acc and d.function.name and d.type == "function"
                    acc[d.index] = {"name": d.function.name, "args": "", "tokens": set()}
                slot = acc[d.index]  # a piece before its call's id and name is a KeyError
                if d.function.arguments:
                    slot["args"] += d.function.arguments
                    slot["tokens"].add(num_tokens)
    calls = [(s["name"], s["args"]) for _, s in sorted(acc.items())]
    return calls, finish, [len(s["tokens"]) for _, s in sorted(acc.items())]


def _tool_calls() -> tuple[list, list]:
    """required, named and auto calls, greedy (also streamed, with logprobs) and sampled; and
    one tool_choice none request last. Returns the calls and per call what to check."""
    named = {"type": "function", "function": {"name": "get_time"}}
    calls, expect = [], []
    for tool_choice, names in (
        ("required", set(PARAMS)),
        (named, {"get_time"}),
        ("auto", set(PARAMS)),
    ):
        for t in (0.0, 1.0):
            for prompt in AUTO_PROMPTS if tool_choice == "auto" else PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                if tool_choice == "auto":
                    messages = HISTORY + messages
                kw = dict(model=MODEL, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                          temperature=t, seed=7, max_tokens=64,
                          parallel_tool_calls=tool_choice != "auto")  # fmt: skip
                calls.append(("chat", kw))
                expect.append((tool_choice, names, None))
                if t == 0.0:
                    calls.append(("chat", dict(kw, stream=True, logprobs=True)))
                    expect.append((tool_choice, names, len(calls) - 2))  # the reply just before
    none = dict(model=MODEL, messages=HISTORY[:1], tools=TOOLS, tool_choice="none", temperature=0,
                max_tokens=20)  # fmt: skip
    return [*calls, ("chat", none)], expect


@pytest.mark.timeout(600)
def test_tool_calls_required_named_auto_validate_and_stream_equal(replies):
    """Every call validates: required, named and auto (text or a call, the call constrained
    once it starts); greedy streams equal the whole replies, arguments arrive token by token."""
    results, expect = replies["tools"], _tool_calls()[1]
    assert results[-1].choices[0].message.tool_calls is None  # tool_choice none: text, no calls
    auto_calls, pieces = 0, []
    for reply, (tool_choice, names, same_as) in zip(results[:-1], expect, strict=True):
        if same_as is None:
            choice = reply.choices[0]
            if tool_choice == "auto" and choice.finish_reason != "tool_calls":
                # text (or cut short by max_tokens, maybe inside a call)
                assert choice.finish_reason == "length" or (
                    choice.message.content and not choice.message.tool_calls
                ), choice
                assert (
                    choice.finish_reason == "length" or "<tool_call>" not in choice.message.content
                )
                continue
            assert choice.finish_reason == "tool_calls", choice
            got = _check_calls(choice.message, names)
            auto_calls += tool_choice == "auto"
        else:
            got, finish, n = _streamed_calls(reply)
            whole = results[same_as].choices[0]
            assert got == [
                (c.function.name, c.function.arguments) for c in whole.message.tool_calls or []
            ]
            assert finish == whole.finish_reason
            pieces += [k for (name, _), k in zip(got, n, strict=True) if name == "get_weather"]
    assert auto_calls >= 1  # the history makes the model call at least once under auto
    assert pieces and min(pieces) >= 2, pieces  # a two-field call's arguments come token by token


def _call(i: int, name: str, arguments: dict) -> dict:
    function = {"name": name, "arguments": json.dumps(arguments)}
    return {"id": f"call_{i}", "type": "function", "function": function}


# a history with two calls in one turn, so that "auto" may call twice for a two-part question
PARALLEL_HISTORY = [
    {"role": "user", "content": "What is the weather in Paris and in London?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            _call(1, "get_weather", {"city": "Paris", "unit": "celsius"}),
            _call(2, "get_weather", {"city": "London", "unit": "celsius"}),
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": '{"temperature": 17}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris and 17 in London."},
]
PARALLEL_PROMPTS = [
    "What is the weather in Tokyo and in Rome?",
    "What time is it in Berlin and in Tokyo?",
]


def _parallel_calls() -> list:
    """auto with parallel_tool_calls true and false, whole and streamed. min_tokens (40, more
    than one call's ~30 tokens) bans EOS after a first call: the grammar must then allow a
    second call (true) or keep its EOS all the same (false)."""
    calls = []
    for parallel in (True, False):
        for prompt in PARALLEL_PROMPTS:
            kw = dict(
                model=MODEL,
                messages=[*PARALLEL_HISTORY, {"role": "user", "content": prompt}],
                tools=TOOLS,
                tool_choice="auto",
                parallel_tool_calls=parallel,
                temperature=0,
                max_tokens=120,
                extra_body={"min_tokens": 40},
            )
            calls += [("chat", kw), ("chat", dict(kw, stream=True))]
    return calls


@pytest.mark.timeout(600)
def test_auto_parallel_tool_calls_true_many_false_at_most_one(replies):
    """parallel_tool_calls false: one call at most, even when EOS is banned after it; true: the
    grammar lets the model call again. Calls validate; streams give the same calls."""
    got = replies["parallel"]
    counts: dict[bool, list[int]] = {True: [], False: []}
    for k in range(0, len(got), 2):
        parallel = k < len(got) // 2
        whole, chunks = got[k].choices[0], got[k + 1]
        calls = _check_calls(whole.message, set(PARAMS)) if whole.message.tool_calls else []
        counts[parallel].append(len(calls))
        if calls:
            assert whole.finish_reason == "tool_calls", whole
        streamed, finish, _ = _streamed_calls(chunks)
        assert streamed == calls and finish == whole.finish_reason
    assert all(n <= 1 for n in counts[False]) and sum(counts[False]) >= 1, counts
    assert max(counts[True]) >= 2, counts  # a second call where false allowed none


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
