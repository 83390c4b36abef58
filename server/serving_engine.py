"""What the two generation endpoints share: model check, limits, admission, length, streams."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from scheduler import SamplingParams
from scheduler.errors import fit_max_tokens
from server.accumulator import LOGPROB_FLOOR, RequestAccumulator
from server.errors import APIError, from_exception
from server.limits import ServingLimits, check_text_length
from server.offload import Offload
from server.protocol.base import PromptLogprob, PromptLogprobs

if TYPE_CHECKING:
    from scheduler import TokenLogprob
    from scheduler.async_engine import AsyncEngine, RequestStream
    from scheduler.outputs import CompletionOutput, RequestOutput
    from server.config import ServerConfig

logger = logging.getLogger(__name__)

_END = object()
# --enable-log-requests without --max-log-len: a prompt is logged cut to this many characters and
# token ids (a 10 MB prompt is neither decoded in full on the event loop nor logged in full)
DEFAULT_MAX_LOG_LEN = 4096


def check_model_name(
    model: str | None, names: tuple[str, ...], param: str | None = "model"
) -> None:
    """OpenAI's 404 for a model this server does not serve (None: the default model); a request
    field (`param`) also hears which names are served."""
    if model is not None and model not in names:
        served = "; this server serves " + ", ".join(f"`{n}`" for n in names) if param else ""
        raise APIError(
            f"The model `{model}` does not exist{served}", 404, param=param, code="model_not_found"
        )


class OpenAIServing:
    """Base of the generation endpoints: requests → engine iterators, errors → 4xx."""

    prefix = "cmpl"

    def __init__(self, engine: AsyncEngine, config: ServerConfig, offload: Offload) -> None:
        """`config.limits` has its max_waiting resolved (build_app)."""
        self.engine = engine
        self.config = config
        self.limits: ServingLimits = config.limits
        self.model_names = config.served_model_names or (engine.model_name,)
        self.defaults: dict[str, Any] = dict(engine.default_sampling_params)
        self.offload = offload

    async def create(self, req: Any) -> Any:
        """The three-way return: a response, an iterator of chunks, or the APIError raised."""
        try:
            return await self._create(req)
        except Exception as e:  # noqa: BLE001 - every error becomes an envelope
            return from_exception(e)

    async def _create(self, req: Any) -> Any:
        raise NotImplementedError

    def sampling_params(self, req: Any) -> SamplingParams:
        """Model check and limits (404/400), then the request's SamplingParams with the
        generation-config defaults for the fields it omitted."""
        check_model_name(req.model, self.model_names)
        self.limits.check(req)
        params = req.to_sampling_params()
        omitted = {
            k: v
            for k, v in self.defaults.items()
            if k != "max_tokens" and getattr(req, k, None) is None
        }
        return replace(params, **omitted) if omitted else params

    def check_text_length(self, num_chars: int, param: str) -> None:
        check_text_length(self.engine, num_chars, param)

    def fit_params(self, prompt_len: int, params: SamplingParams, param: str) -> SamplingParams:
        """max_tokens by the engine's rule (scheduler/errors.py); none given means the rest of
        the context, at most the generation-config default and --max-tokens-limit."""
        caps = [self.limits.max_tokens_limit]
        if params.max_tokens is None:
            caps.append(self.defaults.get("max_tokens"))
        max_tokens = fit_max_tokens(
            prompt_len,
            params.max_tokens,
            self.engine.max_model_len,
            min_tokens=params.min_tokens,
            cap=min((c for c in caps if c is not None), default=None),
            param=param,
        )
        return replace(params, max_tokens=max_tokens)

    async def start(
        self, req: Any, prompts: list[list[int]], params: list[SamplingParams], convert: Callable
    ) -> tuple[dict[str, Any], RequestAccumulator, AsyncIterator[tuple[int, RequestOutput]]]:
        """Compile its constraint off the loop, then queue the request (generate); the head (id,
        created, model: the name it was sent) of the response and each chunk, and the
        accumulator that its outputs go through."""
        await self.engine.prepare(params)  # NOTE: before admission (generate awaits nothing)
        head = {
            "id": f"{self.prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model or self.engine.model_name,
        }
        stream = self.generate(head["id"], prompts, params)
        lens = [len(p) for p in prompts]
        return head, RequestAccumulator(lens, params[0].n, convert, req.timings_per_token), stream

    async def chunks(
        self,
        req: Any,
        head: dict[str, Any],
        acc: RequestAccumulator,
        stream: AsyncIterator[tuple[int, RequestOutput]],
        cls: type,
        choices: Callable[[int, CompletionOutput, list[Any] | None], list[Any]],
        first: Iterable[Any] = (),
    ) -> AsyncIterator[Any]:
        """A `cls` chunk per choice that `choices(index, delta, logprob entries)` makes of each
        engine delta (after `first`), then the usage chunk (choices: []) if asked for."""
        async with aclosing(acc.deltas(stream)) as deltas:
            for choice in first:
                yield cls(**head, choices=[choice], timings=acc.timings())
            async for delta in deltas:
                for choice in choices(*delta):
                    yield cls(**head, choices=[choice], timings=acc.timings())
        if req.include_usage:
            yield cls(**head, choices=[], usage=acc.usage(), timings=acc.timings())

    def generate(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Admit and queue every prompt now; bad input raises here, before any response starts.

        Returns an iterator of (prompt index, RequestOutput); closing it aborts every request.
        NOTE: no `await` from the admission check to the last engine.generate: on the one event
        loop, concurrent requests cannot all pass the check before any of them is counted.
        """
        self.limits.check_admission(self.engine.num_waiting(), sum(sp.n for sp in params))
        if self.config.enable_log_requests and logger.isEnabledFor(logging.INFO):
            self.log_request(request_id, prompts, params)
        streams: list[RequestStream] = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                streams.append(self.engine.generate(rid, p, sp))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return _merge(streams)

    def log_request(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> None:
        """--enable-log-requests: prompts are user data, logged only when asked (vLLM's way),
        cut to --max-log-len (default DEFAULT_MAX_LOG_LEN) characters and token ids."""
        cut = self.config.max_log_len or DEFAULT_MAX_LOG_LEN
        for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            logger.info(
                "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                request_id if len(prompts) == 1 else f"{request_id}-{i}",
                self.engine.tokenizer.decode(ids[:cut])[:cut],
                sp,
                ids[:cut],
            )


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave the prompts' engine streams; closing the merge closes (= aborts) all of them.

    NOTE: the queue is bounded, so a slow consumer leaves outputs in the engine's per-request
    queues, where AsyncEngine's max_pending_outputs cuts it off (no unbounded copy here).
    """
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=len(streams))

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, _END))

    tasks: list[asyncio.Future] = []
    try:
        if len(streams) == 1:  # the common case needs no tasks
            async for out in streams[0]:
                yield 0, out
            return
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for stream in streams:
            stream.close()


async def capture_prompt_logprobs(
    stream: AsyncIterator[tuple[int, RequestOutput]], into: dict[int, list]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Pass the stream through, keeping each prompt's prompt_logprobs (they come once, with
    sample 0's first token) in `into`; closing this closes the stream."""
    async with aclosing(stream):
        async for p, out in stream:
            if out.prompt_logprobs is not None:
                into[p] = out.prompt_logprobs
            yield p, out


def vllm_prompt_logprobs(tokenizer: Any, lps: list[TokenLogprob | None]) -> PromptLogprobs:
    """vLLM's shape: per prompt token, {token id: logprob, rank, decoded_token} for the token
    itself and its top alternatives; None for the first token."""
    out: PromptLogprobs = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {str(lp.token_id): _entry(tokenizer, lp.token_id, lp.logprob, lp.rank)}
        for rank, (t, v) in enumerate(lp.top, 1):
            entry.setdefault(str(t), _entry(tokenizer, t, v, rank))
        out.append(entry)
    return out


def _entry(tokenizer: Any, token_id: int, logprob: float, rank: int) -> PromptLogprob:
    decoded = tokenizer.decode([token_id], skip_special_tokens=False)
    return PromptLogprob(logprob=max(logprob, LOGPROB_FLOOR), rank=rank, decoded_token=decoded)
