"""--root-path: serve under a path prefix, for proxies that forward it (or strip it)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


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
