"""build_app(): the FastAPI app, its lifespan (starts/stops the engine), middleware, thin routes
grouped by API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from server.auth import owner_of
from server.config import ServerConfig
from server.errors import APIError, error_response, install_error_handlers
from server.limits import default_max_waiting
from server.metrics import ServerMetrics, StatsLogger
from server.middleware import install_middleware
from server.offload import Offload, offloaded_json_route
from server.protocol.anthropic import AnthropicCountTokensRequest, AnthropicMessagesRequest
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.protocol.models import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from server.protocol.pooling import EmbeddingRequest, RerankRequest, ScoreRequest
from server.protocol.responses import ResponsesRequest
from server.response_store import ResponseStore
from server.serving_chat import OpenAIServingChat
from server.serving_completion import OpenAIServingCompletion
from server.serving_messages import ServingMessages
from server.serving_models import OpenAIServingModels, version
from server.serving_pooling import OpenAIServingPooling
from server.serving_responses import ServingResponses
from server.sse import EventStream, event_stream_response, sse_response

if TYPE_CHECKING:
    from scheduler.async_engine import AsyncEngine

logger = logging.getLogger(__name__)


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run a handler, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # NOTE: cancel() only asks: until the task has run its cancellation, it has neither
            # a result nor cancelled() (task.result() raised InvalidStateError: a 500)
            await asyncio.wait({task})
    if task.cancelled():
        return APIError("client disconnected", 499)
    return task.result()


def build_app(engine: AsyncEngine, server_config: ServerConfig | None = None) -> FastAPI:
    """The app for one engine; the lifespan starts the engine's step thread and stops it."""
    cfg = _with_max_waiting(engine, server_config or ServerConfig())
    offload = Offload()
    no_docs = dict.fromkeys(("docs_url", "redoc_url", "openapi_url"))
    docs = no_docs if cfg.disable_fastapi_docs else {}
    lifespan = _lifespan(engine, cfg, offload)
    app = FastAPI(title="tokenmill", version=version(), lifespan=lifespan, **docs)
    app.router.route_class = offloaded_json_route(offload)
    app.state.offload = offload  # the lifespan shuts it down
    install_error_handlers(app)
    metrics = ServerMetrics(engine.model_name, vllm_gauges=cfg.vllm_metrics)
    engine.add_stat_listener(metrics.stat_listener)
    if cfg.log_stats:
        engine.add_stat_listener(StatsLogger())
    install_middleware(app, cfg, metrics)
    metrics.add_route(app)
    chat = OpenAIServingChat(engine, cfg, offload)
    api = _Responder(cfg.shutdown_timeout)
    add_openai_routes(app, api, OpenAIServingCompletion(engine, cfg, offload), chat)
    add_anthropic_routes(app, api, ServingMessages(chat))
    store = ResponseStore(cfg.max_stored_responses, cfg.max_stored_responses_bytes)
    add_responses_routes(app, api, ServingResponses(chat, store), cfg)
    add_pooling_routes(app, api, OpenAIServingPooling(engine, cfg, offload))
    models = OpenAIServingModels(engine, cfg, offload, metrics.finished_counts)
    add_info_routes(app, engine, models, chat)
    return app


def _with_max_waiting(engine: AsyncEngine, cfg: ServerConfig) -> ServerConfig:
    """--max-waiting unset: one waiting sequence per KV block (limits.default_max_waiting)."""
    if cfg.limits.max_waiting is not None:
        return cfg
    num_blocks = engine.get_stats().num_total_blocks
    max_waiting = default_max_waiting(num_blocks, engine.max_num_seqs)
    return replace(cfg, limits=replace(cfg.limits, max_waiting=max_waiting))


def _lifespan(engine: AsyncEngine, cfg: ServerConfig, offload: Offload) -> Callable:
    """Start the engine's step thread with the app; on stop, drain it, then the offload pool."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            logger.info("shutting down the engine (timeout %.1f s)", cfg.shutdown_timeout)
            try:
                await engine.shutdown(cfg.shutdown_timeout)  # its grammar threads too
            finally:
                offload.shutdown()

    return lifespan


def _json(result: BaseModel) -> Response:
    return Response(result.model_dump_json(), media_type="application/json")


def _reply(result: BaseModel | APIError) -> Response:
    return error_response(result) if isinstance(result, APIError) else _json(result)


class _Responder:
    """The three-way return: error → JSON with its code, model → JSON, iterator → SSE."""

    def __init__(self, shutdown_grace_s: float) -> None:
        self.shutdown_grace_s = shutdown_grace_s

    async def __call__(self, request: Request, work: Awaitable[Any]) -> Response:
        result = await _unless_disconnected(request, work)
        if isinstance(result, APIError):
            return error_response(result)
        if isinstance(result, BaseModel):
            return _json(result)
        if isinstance(result, EventStream):
            return event_stream_response(result, shutdown_grace_s=self.shutdown_grace_s)
        return sse_response(result, shutdown_grace_s=self.shutdown_grace_s)


def add_openai_routes(
    app: FastAPI,
    respond: _Responder,
    completion: OpenAIServingCompletion,
    chat: OpenAIServingChat,
) -> None:
    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await respond(request, completion.create(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await respond(request, chat.create(body))


def add_anthropic_routes(app: FastAPI, respond: _Responder, messages: ServingMessages) -> None:
    @app.post("/v1/messages")
    async def create_message(body: AnthropicMessagesRequest, request: Request) -> Response:
        return await respond(request, messages.create(body))

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(body: AnthropicCountTokensRequest) -> Response:
        return _reply(await messages.count_tokens(body))


def add_responses_routes(
    app: FastAPI, respond: _Responder, responses: ServingResponses, cfg: ServerConfig
) -> None:
    def owner(request: Request) -> str:
        """Whose stored responses a request sees: its key's, where a key is required."""
        return owner_of(request.headers.raw) if cfg.api_key else ""

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await respond(request, responses.create(body, owner(request)))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str, request: Request) -> Response:
        return _reply(responses.retrieve(response_id, owner(request)))

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request) -> Response:
        return _reply(responses.delete(response_id, owner(request)))

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(
        response_id: str, request: Request, after: str | None = None, limit: int = 20,
        order: str = "desc",
    ) -> Response:  # fmt: skip
        return _reply(responses.input_items(response_id, owner(request), after, limit, order))


def add_pooling_routes(app: FastAPI, respond: _Responder, pooling: OpenAIServingPooling) -> None:
    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        return await respond(request, pooling.embeddings(body))

    @app.post("/v1/rerank")
    @app.post("/rerank")
    @app.post("/v2/rerank")
    async def create_rerank(body: RerankRequest, request: Request) -> Response:
        return await respond(request, pooling.rerank(body))

    @app.post("/score")
    @app.post("/v1/score")
    async def create_score(body: ScoreRequest, request: Request) -> Response:
        return await respond(request, pooling.score(body))


def add_info_routes(
    app: FastAPI, engine: AsyncEngine, models: OpenAIServingModels, chat: OpenAIServingChat
) -> None:
    """The model list, (de)tokenizing, health and version: no generation."""

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(models.models())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        return _json(models.model(model_id))  # OpenAI's 404 through the APIError handler

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> Response:
        return _json(await models.tokenize(body, chat.render))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return _json(await models.detokenize(body))

    @app.get("/health")
    async def health() -> Response:
        if engine.is_healthy():
            return Response(status_code=200)
        reason = engine.dead_reason or "the engine is not running"
        return error_response(APIError(reason, 503, code="engine_dead"))

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": version()}

    @app.get("/stats")
    async def get_stats() -> dict:
        """Debug view of the engine's SchedulerStats (+ finished_total by reason); not OpenAI."""
        return models.stats()
