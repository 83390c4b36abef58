"""The small endpoints: /v1/models, /tokenize, /detokenize, /version, and the /stats debug view."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from server.errors import APIError
from server.limits import check_text_length
from server.offload import Offload
from server.protocol.models import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.serving_engine import check_model_name

if TYPE_CHECKING:
    from scheduler.async_engine import AsyncEngine
    from server.config import ServerConfig


def version() -> str:
    try:
        return importlib.metadata.version("tokenmill")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+source"


class OpenAIServingModels:
    """Answers from the engine's tokenizer and config; no generation."""

    def __init__(
        self,
        engine: AsyncEngine,
        config: ServerConfig,
        offload: Offload,
        finished: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.engine = engine
        self.finished = finished  # finished requests by finish_reason (ServerMetrics' counter)
        self.offload = offload
        self.model_path = config.model_path
        self.model_names = config.served_model_names or (engine.model_name,)
        self.created = int(time.time())

    def card(self, name: str) -> ModelCard:
        return ModelCard(
            id=name,
            created=self.created,
            root=self.model_path,
            max_model_len=self.engine.max_model_len,
        )

    def models(self) -> ModelList:
        """Every --served-model-name, as vLLM lists them."""
        return ModelList(data=[self.card(name) for name in self.model_names])

    def model(self, model_id: str) -> ModelCard:
        """GET /v1/models/{id}: the card, or OpenAI's 404 (param null, code model_not_found)."""
        check_model_name(model_id, self.model_names, param=None)
        return self.card(model_id)

    async def tokenize(
        self, req: TokenizeCompletionRequest | TokenizeChatRequest, render
    ) -> TokenizeResponse:
        """Tokenize off the event loop (inputs are up to --max-request-body-size)."""
        check_model_name(req.model, self.model_names)
        return await self.offload(self._tokenize, req, render)

    def _tokenize(
        self, req: TokenizeCompletionRequest | TokenizeChatRequest, render
    ) -> TokenizeResponse:
        tok = self.engine.tokenizer
        if isinstance(req, TokenizeChatRequest):
            ids = render(req.messages, req.add_generation_prompt)
        else:
            check_text_length(self.engine, len(req.prompt), "prompt")
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = [tok.id_to_token(i) for i in ids] if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids, token_strs=strs
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        check_model_name(req.model, self.model_names)
        return await self.offload(self._detokenize, req)

    def _detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        vocab = self.engine.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=self.engine.tokenizer.decode(req.tokens))

    def stats(self) -> dict:
        """Engine SchedulerStats plus finished requests by reason (debug view, not OpenAI)."""
        stats = dataclasses.asdict(self.engine.get_stats())
        stats["finished_total"] = self.finished()
        return stats
