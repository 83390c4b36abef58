"""`tokenmill serve [MODEL] ...` and `tokenmill worker`: flags (server/flags.py) → uvicorn."""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

from scheduler.config import EngineConfig
from server.config import ServerConfig
from server.flags import configs, make_parser, uvicorn_settings

if TYPE_CHECKING:  # serve() imports them when it runs
    import uvicorn
    from fastapi import FastAPI

    from scheduler.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

FATAL_HEALTH_GRACE_S = 2.0  # after a fatal engine error, /health shows 503 this long, then exit


def run_worker(engine_config: EngineConfig) -> int:
    """`tokenmill worker`: this host's ranks until the head stops them (the process exits 0) or
    is lost (1); returns only when the model cannot be found (1)."""
    from scheduler.engine import run_worker as run

    try:
        run(engine_config)
    except (FileNotFoundError, ValueError) as e:
        logger.error("worker: %s", e)
    return 1


def serve(
    engine_config: EngineConfig,
    server_config: ServerConfig,
    log_level: str,
    uvicorn_kwargs: dict | None = None,
) -> int:
    """Load the model (progress bar), start uvicorn, print one ready line; returns the exit code."""
    from scheduler.async_engine import AsyncEngine
    from server.app import build_app

    try:
        engine = AsyncEngine(
            engine_config,
            step_thread=False,
            max_pending_outputs=server_config.max_pending_outputs,
        )
    except (FileNotFoundError, ValueError, TimeoutError, ConnectionError) as e:
        logger.error("cannot load the model: %s", e)
        return 1
    app = build_app(engine, server_config)
    server = _uvicorn_server(app, engine, engine_config, server_config, log_level, uvicorn_kwargs)
    # NOTE: the engine steps on the main thread (torch's kernels run fastest there) and uvicorn
    # serves from its own (no signal handlers there): ours call its handle_exit, the lifespan
    # drains and stops the engine, and run_forever() returns.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: server.handle_exit(signum, frame))

    def run_server() -> None:
        try:
            server.run()
        finally:
            engine.stop()  # the lifespan stopped it already, unless uvicorn never started

    # NOTE: a 1 ms GIL switch interval (5 ms default) lets the event loop in between the step
    # thread's kernels sooner: lower /health and stream latency.
    sys.setswitchinterval(0.001)
    http = threading.Thread(target=run_server, name="tokenmill-http")
    http.start()
    engine.run_forever()
    if engine.fatal_error is not None:
        # NOTE: the engine cannot serve again: /health shows 503 with the reason for a moment,
        # then HTTP shuts down gracefully (error events reach their clients) and we exit 1 so
        # that Docker or Kubernetes restarts the process
        logger.error("exiting: the engine failed: %s", engine.fatal_error)
        http.join(FATAL_HEALTH_GRACE_S)
        server.should_exit = True
    while http.is_alive():
        http.join(0.5)
    return 0 if server.started and engine.fatal_error is None else 1


def _uvicorn_server(
    app: FastAPI,
    engine: AsyncEngine,
    engine_config: EngineConfig,
    server_config: ServerConfig,
    log_level: str,
    uvicorn_kwargs: dict | None,
) -> uvicorn.Server:
    """uvicorn for `app`, which prints one ready line once it listens (tests and scripts wait
    for it)."""
    import uvicorn

    kv_tokens = engine.get_stats().num_total_blocks * engine_config.block_size
    kwargs = dict(uvicorn_kwargs or {})  # TLS and logging flags
    scheme = "https" if kwargs.get("ssl_certfile") else "http"
    root = "/" + server_config.root_path.strip("/") if server_config.root_path else ""
    ready = (
        f"tokenmill: serving {engine.model_name} at "
        f"{scheme}://{server_config.host}:{server_config.port}{root} "
        f"(KV cache {kv_tokens} tokens, max_model_len {engine.max_model_len})"
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            # NOTE: frozen, the model's ~240k objects are never scanned again by the GC (a full
            # collection held the GIL ~0.4 s on a busy 2-core machine: a /health stall)
            gc.collect()
            gc.freeze()
            await super().startup(sockets=sockets)
            if self.started:
                print(ready, flush=True)

    config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level=kwargs.pop("log_level", None) or log_level,
        timeout_graceful_shutdown=math.ceil(server_config.shutdown_timeout) + 2,
        **kwargs,
    )
    return Server(config)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        engine_config, server_config = configs(args)
        uvicorn_kwargs = uvicorn_settings(args)
        if int(os.environ.get("LOCAL_RANK", 0)) > 0:
            raise ValueError("run one tokenmill process per host (torchrun --nproc-per-node 1)")
        if args.command == "worker" and args.node_rank == 0:
            raise ValueError("node rank 0 is the head: run `tokenmill serve` there")
        if args.command == "serve" and args.node_rank != 0:
            raise ValueError(f"node rank {args.node_rank} runs `tokenmill worker`, not serve")
    except ValueError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    if args.command == "worker":
        return run_worker(engine_config)
    return serve(engine_config, server_config, args.log_level, uvicorn_kwargs)


if __name__ == "__main__":
    sys.exit(main())
