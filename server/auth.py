"""API key check: `Authorization: Bearer KEY` on every route but the operational ones."""

from __future__ import annotations

import hmac

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
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if key_matches(header, self.api_key):
            await self.app(scope, receive, send)
            return
        err = APIError(
            "missing or invalid API key: send `Authorization: Bearer <key>`",
            401,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error_response(err)(scope, receive, send)
