"""tokenmill's on-disk cache: converted GGUF tokenizers and the compiled CPU kernel live here."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path | None:
    """`$TOKENMILL_CACHE_DIR/kind` (default `$XDG_CACHE_HOME/tokenmill`, else `~/.cache/tokenmill`);
    None when TOKENMILL_CACHE_DIR is set to '' (caching disabled)."""
    base = os.environ.get("TOKENMILL_CACHE_DIR")
    if base == "":
        return None
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "tokenmill")
    return Path(os.path.expanduser(base)) / kind
