"""--enable-log-requests: one line per request with its prompt, cut to --max-log-len."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler import SamplingParams

logger = logging.getLogger(__name__)


class RequestLogger:
    """Prompts are user data: logged only when the operator asked (vLLM's RequestLogger)."""

    def __init__(self, decode: Callable[[list[int]], str], max_log_len: int | None = None) -> None:
        self.decode = decode  # the engine tokenizer's
        self.max_log_len = max_log_len  # characters of prompt text and ids of prompt tokens

    def log(self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        limit = self.max_log_len
        for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            text = self.decode(ids[:limit] if limit is not None else ids)
            logger.info(
                "Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                request_id if len(prompts) == 1 else f"{request_id}-{i}",
                text[:limit] if limit is not None else text,
                sp,
                ids[:limit] if limit is not None else ids,
            )
