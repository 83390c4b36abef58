"""Which key a request bears (`Authorization: Bearer KEY` or Anthropic's `x-api-key: KEY`) and
which paths need none; server/middleware.py's APIKeyMiddleware enforces it."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

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
