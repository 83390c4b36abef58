"""API key check: `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`) on every route
but the operational ones."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, error_response

# Probes and scrapers carry no key; everything else (incl. /docs, /tokenize, /stats, unknown
# paths, so route names do not leak) needs it.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})


def key_matches(header: str | None, api_key: str) -> bool:
    """Constant-time compare of the bearer token with the configured key."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request bears: its bearer token, else its `x-api-key` (Anthropic's clients)."""
    bearer = x_api_key = None
    for name, value in headers:
        if name == b"authorization" and bearer is None:
            scheme, _, token = value.decode("latin-1").partition(" ")
            bearer = token.strip() if scheme.lower() == "bearer" else None
        elif name == b"x-api-key" and x_api_key is None:
            x_api_key = value.decode("latin-1").strip()
    return bearer or x_api_key


def owner_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """Who stored a response: a digest of the key it bore (never the key itself); "" if none."""
    key = presented_key(headers)
    return hashlib.sha256(key.encode()).hexdigest() if key else ""


class APIKeyMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware): it must not buffer or delay SSE streams."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    def __repr__(self) -> str:  # NOTE: never the key, whatever logs the middleware stack
        return "APIKeyMiddleware(api_key=<redacted>)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or (path.rstrip("/") in OPEN_PATHS and path != "/"):
            await self.app(scope, receive, send)
            return
        key = presented_key(scope.get("headers", ()))
        if key is not None and hmac.compare_digest(key.encode(), self.api_key.encode()):
            await self.app(scope, receive, send)
            return
        err = APIError(
            "missing or invalid API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`",
            401,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error_response(err)(scope, receive, send)
