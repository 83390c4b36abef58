"""What the two generation endpoints share: model check, admission, length check, streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from model.sampling_params import SamplingParams
from server.errors import APIError, from_exception

if TYPE_CHECKING:
    from scheduler.async_engine import AsyncEngine
    from scheduler.outputs import RequestOutput
    from server.request_logger import RequestLogger

_END = object()


def check_model_name(model: str | None, names: tuple[str, ...]) -> None:
    """OpenAI's 404 for a model this server does not serve (None: the default model)."""
    if model is not None and model not in names:
        served = ", ".join(f"`{n}`" for n in names)
        raise APIError(
            f"The model `{model}` does not exist; this server serves {served}",
            404,
            param="model",
            code="model_not_found",
        )


@dataclass(frozen=True, slots=True)
class ServingLimits:
    """Server-side admission knobs (from the CLI)."""

    max_waiting: int | None = None  # reject with 503 once this many requests wait
    retry_after_s: int = 1


class OpenAIServing:
    """Base of the generation endpoints: requests → engine iterators, errors → 4xx."""

    prefix = "cmpl"

    def __init__(
        self,
        engine: AsyncEngine,
        limits: ServingLimits,
        model_names: tuple[str, ...] = (),
        request_logger: RequestLogger | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self.model_names = model_names or (engine.model_name,)  # --served-model-name a b ...
        self.request_logger = request_logger  # --enable-log-requests
        self.defaults: dict[str, Any] = dict(engine.default_sampling_params)

    @property
    def model_name(self) -> str:
        """The first served name; responses echo the name a request sent, as vLLM does."""
        return self.engine.model_name

    async def run(self, make: Callable[[], Any]) -> Any:
        """Await a handler; return its result or the APIError it raised (the three-way return)."""
        try:
            return await make()
        except Exception as e:  # noqa: BLE001 - every error becomes an envelope
            return from_exception(e)

    def check_model(self, model: str | None) -> None:
        check_model_name(model, self.model_names)

    def sampling_params(self, req: Any) -> SamplingParams:
        """The request's SamplingParams, with generation-config defaults for fields it omitted."""
        params = req.to_sampling_params()
        omitted = {
            k: v
            for k, v in self.defaults.items()
            if k != "max_tokens" and getattr(req, k, None) is None
        }
        return replace(params, **omitted) if omitted else params

    def check_admission(self) -> None:
        """503 + Retry-After when the engine's queue is already at --max-waiting."""
        limit = self.limits.max_waiting
        if limit is None:
            return
        waiting = self.engine.num_waiting()
        if waiting >= limit:
            raise APIError(
                f"server overloaded: {waiting} requests waiting (max_waiting {limit}); retry later",
                503,
                code="server_overloaded",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )

    def fit_params(self, prompt_len: int, params: SamplingParams, param: str) -> SamplingParams:
        """Length check naming both numbers; no max_tokens means 'the rest of the context'."""
        max_len = self.engine.max_model_len
        if params.max_tokens is None:
            room = min(max_len - prompt_len, self.defaults.get("max_tokens", max_len))
            if room < 1:
                raise APIError(
                    f"prompt has {prompt_len} tokens, which leaves no room to generate within "
                    f"max_model_len {max_len}",
                    400,
                    param=param,
                    code="context_length_exceeded",
                )
            return replace(params, max_tokens=max(room, params.min_tokens))
        if prompt_len + params.max_tokens > max_len:
            raise APIError(
                f"prompt has {prompt_len} tokens + max_tokens {params.max_tokens} = "
                f"{prompt_len + params.max_tokens} > max_model_len {max_len}; "
                "shorten the prompt or lower max_tokens",
                400,
                param="max_tokens" if prompt_len < max_len else param,
                code="context_length_exceeded",
            )
        return params

    def new_request_id(self) -> str:
        return f"{self.prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def now() -> int:
        return int(time.time())

    async def generate(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Submit every prompt and wait for each first output, so bad input fails before streaming.

        Returns an iterator of (prompt index, RequestOutput); closing it aborts every request.
        """
        self.check_admission()
        if self.request_logger is not None:
            self.request_logger.log(request_id, prompts, params)
        ids = [
            request_id if len(prompts) == 1 else f"{request_id}-{i}" for i in range(len(prompts))
        ]
        gens = [
            self.engine.generate(rid, p, sp)
            for rid, p, sp in zip(ids, prompts, params, strict=True)
        ]
        firsts = await asyncio.gather(*(_first(g) for g in gens), return_exceptions=True)
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            for g in gens:
                with contextlib.suppress(Exception):
                    await g.aclose()
            raise errors[0]
        if len(gens) == 1:
            return _chain_one(firsts[0], gens[0])
        return _merge(firsts, gens)


async def _first(gen: AsyncIterator[Any]) -> Any:
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return _END


async def _chain_one(first: Any, gen: Any) -> AsyncIterator[tuple[int, Any]]:
    try:
        if first is not _END:
            yield 0, first
            async for out in gen:
                yield 0, out
    finally:
        await gen.aclose()


async def _merge(firsts: list[Any], gens: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several engine iterators; closing the merge cancels (= aborts) all of them."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, gen: Any) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, _END))

    for i, first in enumerate(firsts):
        if first is not _END:
            queue.put_nowait((i, first))
    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
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
