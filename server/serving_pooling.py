"""/v1/embeddings, /v1/rerank and /score on a `--runner pooling` model: inputs → engine.encode
(prefill-only requests) → embeddings; rerank and score are cosine similarities of embeddings."""

from __future__ import annotations

import base64
import math
import sys
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from server.errors import APIError, from_exception
from server.protocol.pooling import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
)
from server.serving_engine import OpenAIServing, check_model_name

if TYPE_CHECKING:
    from scheduler.async_engine import RequestStream


def cosine(a: list[float], b: list[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return dot / norm if norm > 0.0 else 0.0


def _base64(values: list[float]) -> str:
    """OpenAI's base64 encoding: the float32 values' little-endian bytes."""
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


class OpenAIServingPooling(OpenAIServing):
    """The pooling endpoints; every input is one engine request (prefix caching shares KV)."""

    prefix = "embd"

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse | APIError:
        return await self._run(self._embeddings, req)

    async def rerank(self, req: RerankRequest) -> RerankResponse | APIError:
        return await self._run(self._rerank, req)

    async def score(self, req: ScoreRequest) -> ScoreResponse | APIError:
        return await self._run(self._score, req)

    async def _run(self, handler: Callable[[Any], Awaitable[Any]], req: Any) -> Any:
        """Model check, then the handler; every error becomes its envelope (the 3-way return)."""
        try:
            check_model_name(req.model, self.model_names)
            if self.engine.pooler_config is None:
                raise APIError(
                    "embeddings, rerank and score need a pooling model: this one is served "
                    "with --runner generate (start it with --runner pooling)",
                    400,
                    param="model",
                )
            return await handler(req)
        except Exception as e:  # noqa: BLE001 - every error becomes an envelope
            return from_exception(e)

    async def _embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        hidden = self.engine.model_config.hidden_size
        if req.dimensions is not None and not 1 <= req.dimensions <= hidden:
            raise APIError(
                f"dimensions must be in [1, {hidden}] (the model's), got {req.dimensions}",
                param="dimensions",
            )
        prompts = await self.offload(self._input_ids, req.input, self._keep(req))
        vectors = await self.encode_all(prompts)
        data = []
        for i, v in enumerate(vectors):
            if req.dimensions is not None:
                v = v[: req.dimensions]
                if self.engine.pooler_config.normalize:
                    norm = math.sqrt(math.fsum(x * x for x in v))
                    v = [x / norm for x in v] if norm > 0.0 else v
            out = _base64(v) if req.encoding_format == "base64" else v
            data.append(EmbeddingData(embedding=out, index=i))
        tokens = sum(map(len, prompts))
        return EmbeddingResponse(
            **self._head(req),
            data=data,
            usage=PoolingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def _rerank(self, req: RerankRequest) -> RerankResponse:
        if not req.documents:
            raise APIError("documents must not be empty", param="documents")
        self._check_count(1 + len(req.documents), "documents")
        if req.top_n is not None and req.top_n < 0:
            raise APIError(f"top_n must be >= 0, got {req.top_n}", param="top_n")
        texts = [req.query, *req.documents]
        prompts = await self.offload(
            self._texts_ids, texts, ["query"] + ["documents"] * (len(texts) - 1), self._keep(req)
        )
        query, *docs = await self.encode_all(prompts)
        results = [
            RerankResult(
                index=i,
                relevance_score=cosine(query, d),
                document=RerankDocument(text=req.documents[i]) if req.return_documents else None,
            )
            for i, d in enumerate(docs)
        ]
        results.sort(key=lambda r: -r.relevance_score)  # NOTE: stable: ties keep input order
        head = self._head(req)
        return RerankResponse(
            id=head["id"],
            model=head["model"],
            results=results[: req.top_n or None],
            usage=RerankUsage(total_tokens=sum(map(len, prompts))),
        )

    async def _score(self, req: ScoreRequest) -> ScoreResponse:
        one = [req.text_1] if isinstance(req.text_1, str) else req.text_1
        two = [req.text_2] if isinstance(req.text_2, str) else req.text_2
        if not one or not two:
            raise APIError(
                "text_1 and text_2 must not be empty", param="text_1" if not one else "text_2"
            )
        if len(one) != 1 and len(one) != len(two):
            raise APIError(
                f"text_1 has {len(one)} texts and text_2 {len(two)}: give one text_1, or as "
                "many as text_2",
                param="text_1",
            )
        self._check_count(len(one) + len(two), "text_2")
        texts = one + two
        params = ["text_1"] * len(one) + ["text_2"] * len(two)
        prompts = await self.offload(self._texts_ids, texts, params, self._keep(req))
        vectors = await self.encode_all(prompts)
        firsts, seconds = vectors[: len(one)], vectors[len(one) :]
        pairs = zip(firsts * len(seconds) if len(one) == 1 else firsts, seconds, strict=True)
        data = [ScoreData(index=i, score=cosine(a, b)) for i, (a, b) in enumerate(pairs)]
        tokens = sum(map(len, prompts))
        return ScoreResponse(
            **self._head(req),
            data=data,
            usage=PoolingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    def _head(self, req: Any) -> dict[str, Any]:
        return {
            "id": f"{self.prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model or self.engine.model_name,
        }

    def _check_count(self, count: int, param: str) -> None:
        limit = self.limits.max_prompts_per_request
        if count > limit:
            raise APIError(
                f"{count} inputs in one request exceed the server limit "
                f"(--max-prompts-per-request {limit})",
                param=param,
            )

    def _keep(self, req: Any) -> int | None:
        """truncate_prompt_tokens as a count of last tokens to keep (None: keep all)."""
        n, limit = req.truncate_prompt_tokens, self.engine.max_model_len
        if n is None:
            return None
        if n == -1:
            return limit
        if not 1 <= n <= limit:
            raise APIError(
                f"truncate_prompt_tokens must be -1 or in [1, {limit}] (max_model_len), got {n}",
                param="truncate_prompt_tokens",
            )
        return n

    def _input_ids(self, value: Any, keep: int | None = None) -> list[list[int]]:
        """OpenAI's embeddings input forms → token ids per input (off the event loop)."""
        if isinstance(value, str) or (value and all(isinstance(x, int) for x in value)):
            value = [value]
        if not value:
            raise APIError("input must not be empty", param="input")
        self._check_count(len(value), "input")
        ids = [v if isinstance(v, list) else None for v in value]
        texts = [v for v in value if isinstance(v, str)]
        encoded = iter(self._texts_ids(texts, ["input"] * len(texts), keep))
        prompts = [(v[-keep:] if keep else v) if v is not None else next(encoded) for v in ids]
        vocab = self.engine.model_config.vocab_size
        for p in prompts:
            bad = next((t for t in p if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(
                    f"input token id {bad} is out of vocabulary [0, {vocab})", param="input"
                )
        return prompts

    def _texts_ids(
        self, texts: list[str], params: list[str], keep: int | None = None
    ) -> list[list[int]]:
        """Tokenize each text after its cheap length check (then keep its last `keep` tokens);
        an empty one is a 400."""
        for text, param in zip(texts, params, strict=True):
            self.check_text_length(len(text), param)
        out = []
        for text, param in zip(texts, params, strict=True):
            ids = self.engine.tokenizer.encode(text)
            ids = ids[-keep:] if keep else ids
            if not ids:
                raise APIError(f"{param} has an empty text", param=param)
            if len(ids) > self.engine.max_model_len:
                raise APIError(
                    f"{param} has {len(ids)} tokens > max_model_len {self.engine.max_model_len}",
                    param=param,
                    code="context_length_exceeded",
                )
            out.append(ids)
        return out

    async def encode_all(self, prompts: list[list[int]]) -> list[list[float]]:
        """Queue every prompt at once (admission first), then gather their embeddings in order;
        an error or a cancelled request closes (= aborts) every stream."""
        for i, p in enumerate(prompts):
            if not p:
                raise APIError(f"input {i} is empty", param="input")
        self.limits.check_admission(self.engine.num_waiting(), len(prompts))
        rid = f"{self.prefix}-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, p in enumerate(prompts):  # NOTE: no await from the admission check to here
                streams.append(self.engine.encode(f"{rid}-{i}", p))
            vectors = []
            for stream in streams:
                embedding = None
                async for out in stream:
                    if out.error:
                        raise APIError(f"request {out.request_id} failed: {out.error}", 500)
                    embedding = out.embedding
                if embedding is None:
                    raise APIError(f"request {stream.request_id} ended without an embedding", 500)
                vectors.append(embedding)
            return vectors
        finally:
            for stream in streams:
                stream.close()
