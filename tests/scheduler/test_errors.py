"""fit_max_tokens: the one length rule the engine and the server share (exact numbers)."""

from __future__ import annotations

import pytest

from scheduler.errors import PromptTooLongError, SamplingParamsError, fit_max_tokens

pytestmark = pytest.mark.timeout(10)


def test_none_is_the_rest_of_the_context_lowered_by_cap_raised_by_min_tokens() -> None:
    assert fit_max_tokens(10, None, 64) == 54
    assert fit_max_tokens(10, None, 64, cap=16) == 16
    assert fit_max_tokens(10, None, 64, cap=16, min_tokens=20) == 20
    assert fit_max_tokens(10, 30, 64, cap=16) == 16  # a default over --max-tokens-limit
    assert fit_max_tokens(63, None, 64) == 1


def test_too_long_names_the_numbers_and_the_field() -> None:
    with pytest.raises(PromptTooLongError, match=r"prompt has 60 tokens \+ max_tokens 10 > "
                       r"max_model_len 64") as e:  # fmt: skip
        fit_max_tokens(60, 10, 64)
    assert e.value.param == "max_tokens" and isinstance(e.value, SamplingParamsError)
    with pytest.raises(PromptTooLongError, match="prompt has 64 tokens, which leaves no room") as e:
        fit_max_tokens(64, None, 64, param="messages")
    assert e.value.param == "messages"
    with pytest.raises(PromptTooLongError, match="prompt has 70 tokens") as e:
        fit_max_tokens(70, 1, 64, param="prompt")
    assert e.value.param == "prompt"  # the prompt alone is over: max_tokens is not the culprit
    with pytest.raises(PromptTooLongError, match="max_tokens 60 > max_model_len 64"):
        fit_max_tokens(10, None, 64, min_tokens=60)
