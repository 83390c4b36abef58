"""Chunks as Server-Sent Events, `data: [DONE]` last; a client that leaves cancels the iterator,
which closes the engine stream: the request is aborted and its blocks freed."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from server.errors import APIError, error_body, from_exception

logger = logging.getLogger(__name__)


async def _events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[dict]:
    try:
        async for chunk in chunks:
            yield {"data": chunk.model_dump_json()}
    except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-band
        err = from_exception(e)
        yield {"data": json.dumps(error_body(err.message, err.status_code, err.param, err.code))}
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield {"data": "[DONE]"}


def sse_response(
    chunks: AsyncIterator[BaseModel], shutdown_grace_s: float = 0.0
) -> EventSourceResponse:
    """EventSourceResponse over pydantic chunks; on server shutdown streams get a grace period."""
    return EventSourceResponse(
        _events(chunks),
        sep="\n",
        ping=15,
        shutdown_grace_period=shutdown_grace_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@dataclass(slots=True)
class EventStream:
    """Named events (Anthropic's and the Responses API's SSE: `event:` + `data:`, no [DONE]);
    `on_error` turns an error raised mid-stream into that API's last event."""

    events: AsyncIterator[tuple[str, dict]]
    on_error: Callable[[APIError], tuple[str, dict]]


async def _named(stream: EventStream) -> AsyncIterator[dict]:
    try:
        async for name, data in stream.events:
            yield {"event": name, "data": json.dumps(data, ensure_ascii=False)}
    except Exception as e:  # noqa: BLE001 - the status line is already sent; report in-band
        name, data = stream.on_error(from_exception(e))
        yield {"event": name, "data": json.dumps(data)}
    finally:
        aclose = getattr(stream.events, "aclose", None)
        if aclose is not None:
            await aclose()


def event_stream_response(
    stream: EventStream, shutdown_grace_s: float = 0.0
) -> EventSourceResponse:
    """EventSourceResponse over named events; a client that leaves aborts the request."""
    return EventSourceResponse(
        _named(stream),
        sep="\n",
        ping=15,
        shutdown_grace_period=shutdown_grace_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
