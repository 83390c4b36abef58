"""ServerConfig: the HTTP side's settings (the engine's are scheduler/config.py's EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.config import DEFAULT_MAX_PENDING_OUTPUTS
from server.limits import ServingLimits


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """HTTP-side settings; the engine's live in EngineConfig."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: no auth
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    model_path: str | None = None  # shown as `root` in /v1/models
    chat_template: str | None = None  # --chat-template: replaces the model's template
    disable_fastapi_docs: bool = False  # no /docs, /redoc, /openapi.json
    limits: ServingLimits = field(default_factory=ServingLimits)  # max_waiting None: from KV
    max_pending_outputs: int = DEFAULT_MAX_PENDING_OUTPUTS  # AsyncEngine's, set by the CLI
    served_model_names: tuple[str, ...] = ()  # every name clients may send; () → the engine's
    allowed_origins: tuple[str, ...] = ()  # CORS; () sends no CORS headers (vLLM's default is *)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""  # path prefix of a proxy in front (FastAPI's root_path)
    enable_log_requests: bool = False  # log each request's prompt (user data) at info level
    max_log_len: int | None = None  # prompt characters / token ids a logged request shows
    reasoning_parser: str | None = None  # --reasoning-parser: <think> text → `reasoning`
    tool_call_parser: str | None = None  # --tool-call-parser: the model's own call format
    enable_auto_tool_choice: bool = False  # tool_choice auto with a tool-call parser (vLLM)
    log_stats: bool = True  # the 10 s throughput summary (--disable-log-stats turns it off)
    max_stored_responses: int = 1000  # /v1/responses kept for GET and previous_response_id
    max_stored_responses_bytes: int = 64 * 1024 * 1024  # their JSON, least recently used first
    vllm_metrics: bool = True  # vllm:* gauges on /metrics (--disable-vllm-metrics turns off)
