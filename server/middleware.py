"""The ASGI middleware stack, outermost first: root path → HTTP metrics → CORS → Anthropic's
error shape → API key → body size → routes. All pure ASGI: none buffers or delays an SSE stream."""

from __future__ import annotations

import hmac
import json
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import OPEN_PATHS, presented_key
from server.errors import APIError, anthropic_error_body, error_response

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.metrics import ServerMetrics

UNMATCHED_ROUTE = "<unmatched>"  # one label value for every path no route matched (404s, scans)


def install_middleware(app: FastAPI, cfg: ServerConfig, metrics: ServerMetrics) -> None:
    """Add the stack in this file's order, outermost first (Starlette wraps the last added)."""
    # NOTE: metrics sit outside the key and size checks so they count 401s and 413s, CORS too so
    # that 401s carry CORS headers, and Anthropic's error shape covers both checks' errors; the
    # key check comes before the size check: no body is read for a caller without the key
    cors = dict(
        allow_origins=list(cfg.allowed_origins),
        allow_methods=list(cfg.allowed_methods),
        allow_headers=list(cfg.allowed_headers),
        allow_credentials=cfg.allow_credentials,
    )
    stack: list[tuple[type, dict[str, Any]] | None] = [
        (RootPathMiddleware, {"root_path": cfg.root_path}) if cfg.root_path else None,
        (HTTPMetricsMiddleware, {"metrics": metrics, "routes": app.router.routes}),
        (CORSMiddleware, cors) if cfg.allowed_origins else None,
        (AnthropicErrorMiddleware, {}),
        (APIKeyMiddleware, {"api_key": cfg.api_key}) if cfg.api_key else None,
        (BodySizeLimitMiddleware, {"max_size": cfg.limits.max_request_body_size}),
    ]
    for cls, kwargs in reversed([layer for layer in stack if layer is not None]):
        app.add_middleware(cls, **kwargs)


class RootPathMiddleware:
    """Outermost: `/prefix/v1/...` becomes `/v1/...` with root_path `/prefix` (FastAPI's
    root_path semantics), so routes, the API key check and metrics all see the plain path;
    requests a stripping proxy already shortened pass unchanged."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = "/" + root_path.strip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = dict(scope)
            path = scope.get("path", "")
            root = self.root_path
            if path == root or path.startswith(root + "/"):
                scope["path"] = path[len(root) :] or "/"
                raw = scope.get("raw_path")
                if raw is not None and raw.startswith(root.encode()):
                    scope["raw_path"] = raw[len(root) :] or b"/"
            scope["root_path"] = scope.get("root_path", "") + root
        await self.app(scope, receive, send)


class HTTPMetricsMiddleware:
    """Counts responses by route template + status (streams pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: list | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes if routes is not None else []  # the app's list: later routes too

    def route_template(self, scope: Scope) -> str:
        """The matched route's template; for responses sent before routing (401), match here."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", None) or UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started is a 500 to the client
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.count_http(self.route_template(scope), status, time.perf_counter() - start)


class AnthropicErrorMiddleware:
    """On Anthropic's routes, every error body (routes, validation, API key, body size, unknown
    paths) leaves in Anthropic's shape: OpenAI's envelope is rewritten once, here.

    Only error responses (small JSON bodies) are buffered, streams pass untouched."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1/messages") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix)):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = b""

        async def rewriting_send(message: Message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body", False):
                return
            await self._send_rewritten(send, start, body)

        await self.app(scope, receive, rewriting_send)

    @staticmethod
    async def _send_rewritten(send: Send, start: Message, body: bytes) -> None:
        status = start["status"]
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body.decode("utf-8", "replace") or f"HTTP {status}"
        new = json.dumps(anthropic_error_body(message, status)).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(new)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": new})


class APIKeyMiddleware:
    """401 unless the request bears the key (server/auth.py), on all but the open paths."""

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
        length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), b"")
        if length.strip().isdigit() and int(length) > self.max_size:
            await error_response(self._error(str(int(length))))(scope, receive, send)
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
