"""Errors the server maps to HTTP, and the one length rule; torch-free, so server/ imports it."""

from __future__ import annotations

# NOTE: validation errors are model/'s (it cannot import scheduler/), re-exported for server/;
# ConstraintError (model/constraints.py) subclasses SamplingParamsError
from model.sampling_params import SamplingParamsError as SamplingParamsError


class EngineDeadError(RuntimeError):
    """A step failed earlier (or the engine is shut down): no new requests are accepted."""


class EngineFatalError(RuntimeError):
    """A step failed in a way that leaves the engine unusable (dead worker, broken device)."""


class PromptTooLongError(SamplingParamsError):
    """The prompt plus the tokens to generate do not fit in max_model_len."""


def fit_max_tokens(
    prompt_len: int,
    max_tokens: int | None,
    max_model_len: int,
    *,
    min_tokens: int = 0,
    cap: int | None = None,
    param: str = "prompt",
) -> int:
    """Effective max_tokens (None: the rest of the context; `cap` lowers it; >= `min_tokens`)."""
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
        if max_tokens < 1:
            raise PromptTooLongError(
                f"prompt has {prompt_len} tokens, which leaves no room to generate within "
                f"max_model_len {max_model_len}",
                param,
            )
    if cap is not None:
        max_tokens = min(max_tokens, cap)
    max_tokens = max(max_tokens, min_tokens)
    if prompt_len + max_tokens > max_model_len:
        raise PromptTooLongError(
            f"prompt has {prompt_len} tokens + max_tokens {max_tokens} > max_model_len "
            f"{max_model_len}; shorten the prompt or lower max_tokens",
            "max_tokens" if prompt_len < max_model_len else param,
        )
    return max_tokens
