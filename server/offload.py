"""Offload: CPU-heavy request work (JSON, tokenizing, templates, big decodes) off the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pydantic_core
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from scheduler.errors import EngineDeadError

T = TypeVar("T")

# NOTE: two threads: enough to keep a 2-core machine's loop free while one 10 MB prompt tokenizes
# and another request's chat template renders, few enough that floods queue instead of thrashing.
DEFAULT_WORKERS = 2


class Offload:
    """A small thread pool of its own, so heavy inputs never wait behind (or block) other work."""

    def __init__(self, max_workers: int = DEFAULT_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="tokenmill-offload")
        self._closed = False

    def shutdown(self) -> None:
        """On server stop: no new work (a 503); work not yet started is cancelled."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise EngineDeadError("the server is shutting down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))


# Bodies above this are parsed on the pool, so the loop can at least switch to other work.
OFFLOAD_JSON_BYTES = 64 * 1024


def parse_json(body: bytes) -> Any:
    """pydantic-core's parser: 10 MB of ASCII in ~12 ms (json.loads: ~65 ms); refuses lone
    surrogates ("\\ud800"). NOTE: it holds the GIL: --max-request-body-size bounds the cost."""
    return pydantic_core.from_json(body)


def offloaded_json_route(offload: Offload) -> type[APIRoute]:
    """An APIRoute class that parses JSON bodies itself (large ones off the event loop); FastAPI
    reuses the parsed `request._json`. Errors keep FastAPI's shapes (400 via the handlers)."""

    class OffloadedJSONRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route_handler(request: Request) -> Response:
                body = await request.body()
                if body and not hasattr(request, "_json"):
                    try:
                        if len(body) > OFFLOAD_JSON_BYTES:
                            request._json = await offload(parse_json, body)
                        else:
                            request._json = parse_json(body)
                    except (RecursionError, ValueError) as e:  # JSONDecodeError too
                        raise RequestValidationError(
                            [{"type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
                              "msg": str(e) or type(e).__name__, "input": {}}]
                        ) from e  # fmt: skip
                return await handler(request)

            return route_handler

    return OffloadedJSONRoute
