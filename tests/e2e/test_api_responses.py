"""POST /v1/responses and its store (OpenAI's Responses API) with the real `openai` SDK and
`openai-agents` against a real server: answers equal the chat endpoint's, events, tools, store."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from e2e_helpers import KEYED_KEY, TINY_NAME, assert_error, engine_stats, wait_for
from pydantic import BaseModel

pytestmark = pytest.mark.timeout(120)

SYSTEM = "You are terse."
QUESTION = "What is the capital of France?"
GREEDY = {"ignore_eos": True}  # vLLM's extra, passed through to the engine
PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": PARAMS, "strict": True}  # fmt: skip


class City(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool


@pytest.fixture(scope="module")
def client(keyed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEYED_KEY, max_retries=0,
                         timeout=90)  # fmt: skip


def create(client: openai.OpenAI, max_output_tokens: int = 6, **kw):
    kw.setdefault("input", QUESTION)
    return client.responses.create(model=TINY_NAME, instructions=SYSTEM, temperature=0,
                                   max_output_tokens=max_output_tokens, extra_body=GREEDY,
                                   **kw)  # fmt: skip


def test_create_equals_chat_with_usage(client) -> None:
    resp = create(client, metadata={"k": "v"}, user="u1", include=[])
    chat = client.chat.completions.create(
        model=TINY_NAME, max_tokens=6, temperature=0, extra_body=GREEDY,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
    )  # fmt: skip
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.model == TINY_NAME and resp.metadata == {"k": "v"} and resp.user == "u1"
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in resp.output] == ["message"]
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == 6
    assert resp.usage.total_tokens == chat.usage.prompt_tokens + 6
    cached = resp.usage.input_tokens_details.cached_tokens
    assert cached % 16 == 0 and 0 <= cached < resp.usage.input_tokens
    # items (with and without `type`) render as the string does
    items = [{"role": "user", "content": QUESTION}]
    typed = [{"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": QUESTION}]}]  # fmt: skip
    for inp in (items, typed):
        again = create(client, input=inp)
        assert again.output_text == resp.output_text
        assert again.usage.input_tokens == resp.usage.input_tokens


def test_stream_events_in_order(client) -> None:
    whole = create(client, max_output_tokens=7)
    kw = dict(model=TINY_NAME, input=QUESTION, instructions=SYSTEM, temperature=0,
              max_output_tokens=7, extra_body=GREEDY)  # fmt: skip
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    final = events[-1].response  # NOTE: the SDK's get_final_response() wants completed
    assert final.output_text == whole.output_text and final.status == "incomplete"
    assert final.usage.output_tokens == 7
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    assert n >= 1 and types == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * n,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        whole.output_text
    )
    assert events[0].response.status == "in_progress"


def test_parse_json_schema_by_grammar(client) -> None:
    for _ in range(2):
        parsed = client.responses.parse(model=TINY_NAME, input="Weather in Paris?",
                                        text_format=City, max_output_tokens=60)  # fmt: skip
        assert parsed.status == "completed", parsed
        assert isinstance(parsed.output_parsed, City)
    obj = client.responses.create(model=TINY_NAME, input="JSON please", max_output_tokens=60,
                                  text={"format": {"type": "json_object"}},
                                  temperature=0)  # fmt: skip
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)


def test_forced_call_then_its_output_and_previous_response_id(client) -> None:
    first = client.responses.create(
        model=TINY_NAME, input="What is the weather in Paris?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64,
        temperature=0,
    )  # fmt: skip
    assert first.status == "completed" and [o.type for o in first.output] == ["function_call"]
    call = first.output[0]
    assert call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), PARAMS)
    with client.responses.stream(
        model=TINY_NAME, input="What is the weather in Paris?", tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, max_output_tokens=64, temperature=0,
    ) as stream:  # fmt: skip
        events = list(stream)
        streamed = stream.get_final_response()
    assert [(o.name, o.arguments) for o in streamed.output] == [(call.name, call.arguments)]
    types = [e.type for e in events]
    assert types[2] == "response.output_item.added" and types[-1] == "response.completed"
    assert types[-3:-1] == ["response.function_call_arguments.done", "response.output_item.done"]
    # the call's output, continuing from the stored response
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees"}
    kw = dict(model=TINY_NAME, tools=[WEATHER], max_output_tokens=4, temperature=0,
              tool_choice="none", extra_body=GREEDY)  # fmt: skip
    follow = client.responses.create(input=[output], previous_response_id=first.id, **kw)
    assert follow.previous_response_id == first.id and follow.output[0].type == "message"
    # the same conversation sent whole renders the same prompt
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               call.model_dump(exclude_none=True), output]  # fmt: skip
    whole = client.responses.create(input=history, store=False, **kw)
    alone = client.responses.create(input=history[:1], store=False, **kw)
    assert whole.usage.input_tokens == follow.usage.input_tokens > alone.usage.input_tokens + 10
    assert whole.output_text == follow.output_text


def test_retrieve_input_items_and_delete(client, keyed_server) -> None:
    items = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
    resp = create(client, input=items)
    got = client.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == resp.output_text
    assert got.usage.input_tokens == resp.usage.input_tokens
    listed = client.responses.input_items.list(resp.id)
    assert [i.content[0].text for i in listed.data] == [f"turn {i}" for i in range(4, -1, -1)]
    page = client.responses.input_items.list(resp.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["turn 0", "turn 1"] and page.has_more
    rest = client.responses.input_items.list(resp.id, limit=10, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["turn 2", "turn 3", "turn 4"]
    assert not rest.has_more
    all_ids = [i.id for i in client.responses.input_items.list(resp.id).data]
    assert len(set(all_ids)) == 5
    client.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    headers = {"Authorization": f"Bearer {KEYED_KEY}"}
    for method, path in (("GET", resp.id), ("DELETE", resp.id), ("GET", f"{resp.id}/input_items"),
                         ("GET", "resp_unknown")):  # fmt: skip
        r = httpx.request(method, f"{keyed_server.url}/v1/responses/{path}", headers=headers)
        assert "not found" in assert_error(r, 404, "response_id")["message"]
    unstored = create(client, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        create(client, previous_response_id=unstored.id)


def test_openai_agents_agent_with_a_function_tool(keyed_server) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"21 degrees in {city}"

    def agent() -> agents.Agent:
        """An agent with its own client: each asyncio loop needs one (run_sync runs its own)."""
        aclient = openai.AsyncOpenAI(base_url=f"{keyed_server.url}/v1", api_key=KEYED_KEY,
                                     max_retries=0, timeout=90)  # fmt: skip
        return agents.Agent(
            name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
            model=agents.OpenAIResponsesModel(model=TINY_NAME, openai_client=aclient),
            # NOTE: EOS made likely, so that the turn after the call (tool_choice auto again)
            # ends before max_tokens (incomplete is an error to the SDK); the call's grammar
            # holds it off until the call is whole
            model_settings=agents.ModelSettings(tool_choice="required", max_tokens=40,
                                                temperature=0, parallel_tool_calls=False,
                                                extra_body={"logit_bias": {"2": 100}}),
        )  # fmt: skip

    result = agents.Runner.run_sync(agent(), "What is the weather in Paris?", max_turns=3)
    assert len(calls) == 1 and calls[0] in ("Paris", "Rome", "Oslo")
    assert isinstance(result.final_output, str)
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"], kinds

    async def streamed() -> list[str]:  # the SDK's stream: true
        run = agents.Runner.run_streamed(agent(), "What is the weather in Paris?", max_turns=3)
        names = [event.type async for event in run.stream_events()]
        assert [item.type for item in run.new_items] == kinds
        assert run.final_output == result.final_output
        return names

    names = asyncio.run(streamed())
    assert "raw_response_event" in names and len(calls) == 2 and calls[1] == calls[0]


WRONG = [None, "text", 1.5, -1, 2**70, True, [], {}, [[1]], {"a": 1}, "\u0000", "🙂" * 3]


def test_hostile_input_gets_openai_4xx(keyed_server) -> None:
    url, headers = keyed_server.url, {"Authorization": f"Bearer {KEYED_KEY}"}
    good = {"model": TINY_NAME, "input": QUESTION, "max_output_tokens": 1, "instructions": "x",
            "tools": [WEATHER], "tool_choice": "auto", "temperature": 0.5, "top_p": 0.9,
            "text": {"format": {"type": "text"}}, "metadata": {"a": "b"}, "user": "u",
            "store": False, "include": [], "parallel_tool_calls": True}  # fmt: skip
    statuses: set[int] = set()
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        for field in good:
            for value in WRONG if field != "max_output_tokens" else WRONG[1:]:  # None: no limit
                for stream in (False, True):
                    resp = http.post("/v1/responses", json={**good, field: value,
                                                            "stream": stream})  # fmt: skip
                    statuses.add(resp.status_code)
                    if resp.status_code != 200:
                        assert resp.status_code < 500, resp.text
                        assert_error(resp, resp.status_code)
                    elif stream:
                        assert "event: response.completed" in resp.text or (
                            "event: response.incomplete" in resp.text
                        ), resp.text
        assert 400 in statuses and 200 in statuses

        def bad(body: dict, status: int = 400, param: str | None = "any") -> str:
            resp = http.post("/v1/responses", json={**good, **body})
            return assert_error(resp, status, param)["message"]

        image = {"type": "input_image", "image_url": "http://x/y.png"}
        msg = bad({"input": [{"role": "user", "content": [image]}]})
        assert "'input_image' is not supported" in msg
        assert "'web_search'" in bad({"tools": [{"type": "web_search"}]})
        assert "'item_reference'" in bad({"input": [{"type": "item_reference", "id": "x"}]})
        assert "not found" in bad({"previous_response_id": "resp_nope"}, 404)
        bad({"model": "gpt-5"}, 404)
        bad({"text": {"format": {"type": "json_schema", "name": "x"}}})
        bad({"tool_choice": {"type": "function", "name": "nope"}})
        many = [{"role": "user", "content": "word " * 20}] * 3000  # thousands of items
        assert "max_model_len" in bad({"input": many}, param="input")
        huge = http.post("/v1/responses", json={**good, "input": "x" * (5 * 2**20)})
        assert_error(huge, 413)
        for query in ("limit=0", "limit=101", "order=up", "limit=x"):
            stored = http.post("/v1/responses", json={**good, "store": True}).json()["id"]
            assert_error(http.get(f"/v1/responses/{stored}/input_items?{query}"), 400)
        r = http.get(f"/v1/responses/{stored}/input_items?after=msg_nope")
        assert_error(r, 404, "after")


def test_a_client_that_leaves_aborts_its_request(keyed_server) -> None:
    """Both APIs' streams: closing the connection after the first delta frees the engine."""
    url, headers = keyed_server.url, {"Authorization": f"Bearer {KEYED_KEY}"}
    bodies = {
        "/v1/responses": {"model": TINY_NAME, "input": QUESTION, "stream": True,
                          "max_output_tokens": 3000, "ignore_eos": True},
        "/v1/messages": {"model": TINY_NAME, "max_tokens": 3000, "stream": True,
                         "messages": [{"role": "user", "content": QUESTION}], "ignore_eos": True},
    }  # fmt: skip
    for path, body in bodies.items():
        aborted = engine_stats(url, KEYED_KEY)["finished_total"]["abort"]
        with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any("delta" in line for line in lines)
            lines.close()  # NOTE: closes the response: the client has left

        def gone(aborted: int = aborted) -> bool:
            stats = engine_stats(url, KEYED_KEY)
            return stats["finished_total"]["abort"] == aborted + 1 and stats["num_running"] == 0

        wait_for(gone, 30, f"{path}: the request aborted")
