"""Pooling API shapes: OpenAI's /v1/embeddings, Jina/Cohere's /v1/rerank, vLLM's /score."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt

from server.protocol.base import _Request

# an input: text, token ids, or a list of either (OpenAI's embeddings input)
EmbeddingInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class _PoolingRequest(_Request):
    model: str | None = None
    truncate_prompt_tokens: StrictInt | None = None  # vLLM's: keep each input's last N (-1: all)


class EmbeddingRequest(_PoolingRequest):
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None  # truncate (then renormalize where the model does)
    user: str | None = None


class RerankRequest(_PoolingRequest):
    query: str
    documents: list[str]
    top_n: StrictInt | None = None  # None or 0: every document
    return_documents: StrictBool = True


class ScoreRequest(_PoolingRequest):
    text_1: str | list[str]
    text_2: str | list[str]


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # str: base64 of little-endian float32
    index: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(BaseModel):
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]  # best first
    usage: RerankUsage


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData] = Field(default_factory=list)
    usage: PoolingUsage
