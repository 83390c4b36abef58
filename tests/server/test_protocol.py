"""server/protocol/ → SamplingParams, errors.py envelopes, auth.py compare: no engine, no server."""

from __future__ import annotations

import logging

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from scheduler.errors import EngineDeadError, PromptTooLongError, SamplingParamsError
from server.auth import key_matches
from server.errors import APIError, error_body, from_exception, validation_error
from server.protocol.chat import ChatCompletionRequest, DeltaMessage
from server.protocol.completions import CompletionRequest
from server.protocol.models import TokenizeChatRequest, TokenizeCompletionRequest

pytestmark = pytest.mark.timeout(10)


def test_completion_request_maps_every_field() -> None:
    req = CompletionRequest.model_validate(
        {
            "prompt": [1, 2, 3],
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "stop": "END",
            "seed": 11,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "logit_bias": {"42": -5, "7": 3.5},
            "logprobs": 3,
            "user": "u",
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "stop_token_ids": [9],
            "ignore_eos": True,
            "min_tokens": 2,
        }
    )
    p = req.to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.seed) == (7, 0.5, 0.9, 2, 11)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.1, 0.2, 1.1)
    assert (p.top_k, p.min_p, p.min_tokens, p.ignore_eos) == (20, 0.05, 2, True)
    assert p.stop == ["END"] and p.stop_token_ids == [9]
    assert p.logit_bias == {42: -5.0, 7: 3.5} and p.logprobs == 3


def test_defaults_follow_openai() -> None:
    p = CompletionRequest(prompt="hi").to_sampling_params()
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.logprobs) == (16, 1.0, 1.0, 1, None)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    assert chat.to_sampling_params().max_tokens is None  # up to the context length


def test_chat_max_completion_tokens_wins_and_logprobs_map() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
            "max_tokens": 50,
            "max_completion_tokens": 5,
            "logprobs": True,
            "top_logprobs": 4,
        }
    )
    p = req.to_sampling_params()
    assert (p.max_tokens, p.logprobs) == (5, 4)
    no_top = req.model_copy(update={"top_logprobs": None})
    assert no_top.to_sampling_params().logprobs == 0


def test_chat_message_parts_render_as_text() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        }
    )
    assert [m.to_template() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": "x", "stop": ["ok", ""]}, "stop"),
    ],
)
def test_bad_completion_values_name_their_param(body: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as info:
        CompletionRequest.model_validate(body).to_sampling_params()
    assert info.value.param == param


def test_chat_top_logprobs_needs_logprobs() -> None:
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(SamplingParamsError) as info:
        ChatCompletionRequest.model_validate(
            {"messages": msgs, "top_logprobs": 2}
        ).to_sampling_params()
    assert info.value.param == "top_logprobs"
    with pytest.raises(SamplingParamsError) as info:
        ChatCompletionRequest.model_validate(
            {"messages": msgs, "logprobs": True, "top_logprobs": 30}
        ).to_sampling_params()
    assert info.value.param == "top_logprobs"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),  # strings are not numbers
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "tools": [{"type": "function"}]}, "tools"),  # unsupported: a 400
        ({"prompt": "x", "response_format": "json"}, "response_format"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_wrong_types_become_400_with_param(body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    err = validation_error(RequestValidationError(info.value.errors()))
    assert err.status_code == 400 and err.param == param, err.message


def test_chat_rejects_images_and_unknown_roles() -> None:
    for msg in (
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "robot", "content": "x"},
    ):
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate({"messages": [msg]})
        assert validation_error(RequestValidationError(info.value.errors())).param == "messages"


def test_error_envelope_and_exception_mapping() -> None:
    assert error_body("m", 404, "model", "model_not_found") == {
        "error": {
            "message": "m",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert error_body("boom", 500)["error"]["type"] == "server_error"
    e = from_exception(SamplingParamsError("top_p bad", "top_p"))
    assert (e.status_code, e.param) == (400, "top_p")
    e = from_exception(PromptTooLongError("prompt has 9 tokens + max_tokens 8 > ...", "max_tokens"))
    assert (e.status_code, e.param, e.code) == (400, "max_tokens", "context_length_exceeded")
    e = from_exception(EngineDeadError("worker rank 1 died"))
    assert (e.status_code, e.code) == (503, "engine_unavailable") and "rank 1" in e.message
    # named types only: a ValueError from deep inside is a bug (500, logged), not the client's
    assert from_exception(ValueError("int('x')")).status_code == 500
    assert from_exception(RuntimeError("bug")).status_code == 500
    api = APIError("x", 503, headers={"Retry-After": "1"})
    assert from_exception(api) is api


def test_delta_omits_absent_fields() -> None:
    assert DeltaMessage(role="assistant", content="").model_dump() == {
        "role": "assistant",
        "content": "",
    }
    assert DeltaMessage(content="hi").model_dump() == {"content": "hi"}
    assert DeltaMessage().model_dump() == {}


def test_tokenize_request_union_members() -> None:
    assert TokenizeCompletionRequest.model_validate({"prompt": "x"}).add_special_tokens
    chat = TokenizeChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    assert chat.add_generation_prompt


def test_api_key_compare() -> None:
    assert key_matches("Bearer sekret", "sekret")
    assert key_matches("bearer sekret", "sekret")
    assert not key_matches("Bearer sekret2", "sekret")
    assert not key_matches("sekret", "sekret")
    assert not key_matches(None, "sekret")
    assert not key_matches("Basic sekret", "sekret")


def test_unknown_fields_are_ignored_but_neutral_values_of_unsupported_ones_pass() -> None:
    req = CompletionRequest.model_validate(
        {"prompt": "x", "bogus": 1, "tool_choice": "none", "response_format": {"type": "text"},
         "best_of": 1, "store": False, "metadata": {"a": "b"}}
    )  # fmt: skip
    assert req.to_sampling_params().n == 1


def test_many_unknown_fields_log_one_line_per_request(caplog) -> None:
    """A 4 MiB body can hold ~10^5 unknown fields, top-level or nested: one WARNING in all."""
    msg = {"role": "user", "content": "hi", "zz": 1}
    body = {"messages": [msg] * 50, "stream_options": {"include_usage": True, "q": 1},
            **{f"f{i}": i for i in range(5000)}}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="server.protocol"):
        ChatCompletionRequest.model_validate(body)
        CompletionRequest.model_validate({"prompt": "x", "y" * 1000: 1})
        CompletionRequest.model_validate({"prompt": "x"})
    assert [r.getMessage() for r in caplog.records] == [
        "ignoring 5002 unknown request field(s): 'q', 'zz', 'f0', 'f1', 'f2', 'f3', 'f4', 'f5' "
        "(+4994 more)",
        f"ignoring 1 unknown request field(s): '{'y' * 64}'",
    ]


def test_image_parts_are_named_in_the_error() -> None:
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": [msg]})
    err = validation_error(RequestValidationError(info.value.errors()))
    assert err.param == "messages" and "'image_url' is not supported" in err.message


def test_echo_with_logprobs_asks_prompt_logprobs_and_max_tokens_0_samples_one() -> None:
    body = {"prompt": "x", "echo": True, "logprobs": 1, "max_tokens": 0, "prompt_logprobs": 0}
    req = CompletionRequest.model_validate(body)
    p = req.to_sampling_params()
    assert (p.prompt_logprobs, p.logprobs, p.max_tokens, req.echo_only) == (1, 1, 1, True)
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2}
    )
    assert chat.to_sampling_params().prompt_logprobs == 2
