"""Per-request limits (each a `tokenmill serve` flag): a 400 naming the field and limit before
any work, so one request cannot buy unbounded CPU, memory or queue (the body size cap, a 413, is
server/middleware.py's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scheduler import MAX_LOGPROBS
from server.errors import APIError

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServingLimits:
    """Admission and per-request limits; None means no limit."""

    max_waiting: int | None = None  # sequences (prompts x n) queued before 503 + Retry-After
    retry_after_s: int = 1
    max_request_body_size: int = 4 * MiB  # bytes; 413 past it
    max_prompts_per_request: int = 256  # /v1/completions batched prompts
    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_string_length: int = 256  # characters, each
    max_logit_bias: int = 1024  # entries
    max_tokens_limit: int | None = None  # cap on max_tokens (None: max_model_len)
    max_logprobs: int = MAX_LOGPROBS  # logprobs (completions) / top_logprobs (chat)

    def check(self, req: Any) -> None:
        """400 naming the field and the limit; reads the raw request fields (no tokenization)."""
        stop, prompt = getattr(req, "stop", None), getattr(req, "prompt", None)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        batched = isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str)
        num_prompts, longest = len(prompt) if batched else 0, max(map(len, stops), default=0)
        num_bias = len(getattr(req, "logit_bias", None) or {})
        # (field, value, the limit = its flag, what the value is)
        rows = [
            ("n", getattr(req, "n", 1), "max_n", "n is {}"),
            ("prompt", num_prompts, "max_prompts_per_request", "{} prompts in one request"),
            ("stop", len(stops), "max_stop_strings", "{} stop strings"),
            ("stop", longest, "max_stop_string_length", "a stop string of {} characters"),
            ("logit_bias", num_bias, "max_logit_bias", "{} logit_bias entries"),
        ]
        # NOTE: min_tokens too: it raises a capped default max_tokens to itself (fit_params); a
        # default (completions' 16) is capped instead
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field in req.model_fields_set:
                rows.append((field, getattr(req, field), "max_tokens_limit", f"{field} is {{}}"))
        for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
            if type(value := getattr(req, field, None)) is int:  # chat's logprobs is a bool
                rows.append((field, value, "max_logprobs", f"{field} is {{}}"))
        for field, value, name, what in rows:
            limit = getattr(self, name)
            if isinstance(value, int) and limit is not None and value > limit:
                flag = "--" + name.replace("_", "-")
                raise APIError(
                    f"{what.format(value)} exceeds the server limit ({flag} {limit})",
                    400,
                    param=field,
                )

    def check_admission(self, num_waiting: int, num_new: int) -> None:
        """503 + Retry-After when `num_new` more sequences would pass --max-waiting (400 if they
        never could). Call it with no `await` between it and adding the request (atomic)."""
        limit = self.max_waiting
        if limit is None:
            return
        if num_new > limit:
            raise APIError(
                f"request needs {num_new} sequences (prompts x n) > max_waiting {limit}: "
                "split it into smaller requests",
                400,
                param="n",
                code="too_many_sequences",
            )
        if num_waiting + num_new > limit:
            raise APIError(
                f"server overloaded: {num_waiting} sequences waiting + {num_new} new > "
                f"max_waiting {limit}; retry later",
                503,
                code="server_overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            )


def default_max_waiting(num_kv_blocks: int, max_num_seqs: int) -> int:
    """One waiting sequence per KV block (at least 2 x max_num_seqs): a queue the cache can
    plausibly drain, instead of an unbounded one."""
    return max(num_kv_blocks, 2 * max_num_seqs)


def check_text_length(engine: Any, num_chars: int, param: str) -> None:
    """Refuse text longer than max_model_len tokens of `tokenizer.max_token_chars` characters
    each: in microseconds, where tokenizing 10 MB takes seconds (30 s on a busy 2-core host)."""
    per_token = max(engine.tokenizer.max_token_chars, 1)
    at_least = num_chars // per_token
    if at_least > engine.max_model_len:
        raise APIError(
            f"{param} has {num_chars} characters, so at least {at_least} tokens > "
            f"max_model_len {engine.max_model_len}",
            400,
            param=param,
            code="context_length_exceeded",
        )
