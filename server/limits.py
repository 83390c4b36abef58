"""Per-request limits (each a `tokenmill serve` flag) and the request-body size cap.

A request over a limit is a 400 (413 for the body) that names the field and the limit, before any
tokenization or engine work, so one request cannot buy unbounded CPU, memory or queue space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler import MAX_LOGPROBS
from server.errors import APIError, error_response

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
        n = getattr(req, "n", 1)
        if isinstance(n, int) and n > self.max_n:
            _over("n", f"n is {n}", f"--max-n {self.max_n}")
        prompt = getattr(req, "prompt", None)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            if len(prompt) > self.max_prompts_per_request:
                _over(
                    "prompt",
                    f"{len(prompt)} prompts in one request",
                    f"--max-prompts-per-request {self.max_prompts_per_request}",
                )
        stop = getattr(req, "stop", None)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.max_stop_strings:
            _over(
                "stop", f"{len(stops)} stop strings", f"--max-stop-strings {self.max_stop_strings}"
            )
        longest = max((len(s) for s in stops), default=0)
        if longest > self.max_stop_string_length:
            _over(
                "stop",
                f"a stop string of {longest} characters",
                f"--max-stop-string-length {self.max_stop_string_length}",
            )
        bias = getattr(req, "logit_bias", None) or {}
        if len(bias) > self.max_logit_bias:
            _over(
                "logit_bias",
                f"{len(bias)} logit_bias entries",
                f"--max-logit-bias {self.max_logit_bias}",
            )
        # NOTE: min_tokens too: it raises a capped default max_tokens to itself (fit_params)
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if field not in req.model_fields_set:  # a default (completions' 16) is capped instead
                continue
            value = getattr(req, field, None)
            limit = self.max_tokens_limit
            if isinstance(value, int) and limit is not None and value > limit:
                _over(field, f"{field} is {value}", f"--max-tokens-limit {limit}")
        for field in ("logprobs", "top_logprobs"):
            value = getattr(req, field, None)
            if type(value) is int and value > self.max_logprobs:
                _over(field, f"{field} is {value}", f"--max-logprobs {self.max_logprobs}")

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
    """Reject text that cannot fit in max_model_len before paying to tokenize it.

    NOTE: a token covers at most `tokenizer.max_token_chars` characters, so `num_chars`
    characters are at least num_chars / max_token_chars tokens: a 10 MB prompt is refused in
    microseconds instead of tokenizing for seconds (30 s on a busy 2-core machine).
    """
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


def _over(param: str, what: str, limit: str) -> None:
    raise APIError(f"{what} exceeds the server limit ({limit})", 400, param=param)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the cap (FastAPI re-raises HTTPException
    from body parsing, so the error handlers turn it into the 413 envelope)."""

    def __init__(self, max_size: int) -> None:
        super().__init__(413, _too_large(f"more than {max_size}", max_size))
        self.code = "request_too_large"


def _too_large(size: str, max_size: int) -> str:
    return (
        f"request body of {size} bytes exceeds the server limit "
        f"(--max-request-body-size {max_size})"
    )


class BodySizeLimitMiddleware:
    """413 for a body over the cap: by Content-Length up front, else counted as it arrives."""

    def __init__(self, app: ASGIApp, max_size: int) -> None:
        self.app = app
        self.max_size = max_size

    def _error(self, size: str) -> APIError:
        return APIError(_too_large(size, self.max_size), 413, code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = 0
                if length > self.max_size:
                    await error_response(self._error(str(length)))(scope, receive, send)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_size:
                    raise BodyTooLarge(self.max_size)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await error_response(self._error(f"more than {self.max_size}"))(scope, receive, send)
