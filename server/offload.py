"""Offload: CPU-heavy request work (tokenizing, chat templates, big decodes) off the event loop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# NOTE: two threads: enough to keep a 2-core machine's loop free while one 10 MB prompt tokenizes
# and another request's chat template renders, few enough that floods queue instead of thrashing.
DEFAULT_WORKERS = 2


class Offload:
    """A small thread pool of its own, so heavy inputs never wait behind (or block) other work."""

    def __init__(self, max_workers: int = DEFAULT_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="tokenmill-offload")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
