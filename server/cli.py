"""`tokenmill serve [MODEL] ...`: flags (vLLM's names) → EngineConfig + ServerConfig → uvicorn."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import sys
import threading

from scheduler.config import DTYPES, QUANTIZATIONS, EngineConfig
from server.app import ServerConfig
from server.cli_vllm import (
    add_limit_args,
    add_vllm_flags,
    http_settings,
    limits_from_args,
    positive,
    size,
    uvicorn_settings,
)

logger = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FATAL_HEALTH_GRACE_S = 2.0  # after a fatal engine error, /health shows 503 this long, then exit


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill", description="An OpenAI-compatible LLM server."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_flags(sub.add_parser("serve", help="serve a model over the OpenAI API"))
    add_serve_flags(
        sub.add_parser(
            "worker",
            help="run this host's tensor-parallel ranks for the head's `serve` (no HTTP; takes "
            "serve's flags, so the same command line works with another --node-rank)",
        )
    )
    return parser


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "model",
        nargs="?",
        default=None,
        help="Hugging Face folder, .gguf file, or a repo id already in the local Hugging Face "
        "cache (default: embedded SmolLM2-135M-Instruct)",
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model names in the API, all listed and accepted; the first names metrics "
        "(default: the repo id, or the model's folder or file name)",
    )
    add_vllm_flags(s)
    s.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health, /metrics and "
        "/version (or set TOKENMILL_API_KEY)",
    )
    s.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="serve no /docs, /redoc or /openapi.json",
    )
    s.add_argument(
        "--max-model-len",
        type=positive,
        default=None,
        help="context length (default: the model's, capped by the KV cache)",
    )
    s.add_argument(
        "--max-num-seqs",
        type=positive,
        default=None,
        help="sequences in one batch (default: 256 on CUDA, 32 on CPU)",
    )
    s.add_argument(
        "--max-num-batched-tokens", type=positive, default=None, help="default: 2048; 1024 on CPU"
    )
    s.add_argument(
        "--kv-cache-memory",
        type=size,
        default=None,
        help="KV cache size, e.g. 2GiB or 512MiB (default: sized to the machine)",
    )
    s.add_argument("--block-size", type=positive, default=16)
    s.add_argument("--tensor-parallel-size", "-tp", type=positive, default=1)
    add_distributed_flags(s)
    s.add_argument("--dtype", choices=DTYPES, default="auto")
    s.add_argument(
        "--quantization",
        "-q",
        choices=QUANTIZATIONS,
        default=None,
        help="none: dequantize a GGUF to float (the reference path); int8/int4: pack float "
        "weights at load (group 32). Default: a GGUF's own quantization, float for HF folders",
    )
    s.add_argument(
        "--kv-cache-dtype",
        choices=DTYPES,
        default="auto",
        help="dtype the KV cache is stored in (auto: the model's dtype)",
    )
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument(
        "--chat-template",
        default=None,
        help="a Jinja chat template file that replaces the model's",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM before they are aborted",
    )
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    add_limit_args(s)


def add_distributed_flags(s: argparse.ArgumentParser) -> None:
    """Multi-host tensor parallelism; torchrun's variables are the defaults (one process a host:
    WORLD_SIZE hosts, RANK this host's rank)."""
    env = os.environ
    s.add_argument(
        "--nnodes",
        type=positive,
        default=int(env.get("WORLD_SIZE", 1)),
        help="hosts the tensor-parallel ranks span, tp/nnodes ranks each (default: $WORLD_SIZE, 1)",
    )
    s.add_argument(
        "--node-rank",
        type=int,
        default=int(env.get("RANK", 0)),
        help="this host: 0 runs `serve` (the head), 1..nnodes-1 run `worker` (default: $RANK, 0)",
    )
    s.add_argument(
        "--master-addr",
        default=env.get("MASTER_ADDR", "127.0.0.1"),
        help="the head's address every host reaches (default: $MASTER_ADDR, 127.0.0.1)",
    )
    s.add_argument(
        "--master-port",
        type=int,
        default=int(env.get("MASTER_PORT", 0)),
        help="the head's rendezvous port (default: $MASTER_PORT; a free one on a single host)",
    )
    s.add_argument(
        "--distributed-timeout",
        type=float,
        default=300.0,
        help="seconds every host gets to join before start-up fails naming the missing ones",
    )


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Parsed flags → the two configs; the API key falls back to $TOKENMILL_API_KEY."""
    names = tuple(dict.fromkeys(args.served_model_name or ()))
    engine_config = EngineConfig(
        model=args.model,
        served_model_name=names[0] if names else None,
        tokenizer=args.tokenizer,
        revision=args.revision,
        tokenizer_revision=args.tokenizer_revision,
        download_dir=args.download_dir,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        distributed_timeout=args.distributed_timeout,
        seed=args.seed,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    server_config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("TOKENMILL_API_KEY") or None,
        shutdown_timeout=args.shutdown_timeout,
        model_path=args.model,
        chat_template=_read_template(args.chat_template),
        disable_fastapi_docs=args.disable_fastapi_docs,
        limits=limits_from_args(args),
        max_pending_outputs=args.max_pending_outputs,
        **http_settings(args),
        served_model_names=names,
    )
    return engine_config, server_config


def _read_template(path: str | None) -> str | None:
    """--chat-template FILE → its text; an unreadable file stops start-up with its name."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SystemExit(f"--chat-template: cannot read {path}: {e.strerror}") from e


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
    import uvicorn

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
    stats = engine.get_stats()
    kv_tokens = stats.num_total_blocks * engine_config.block_size
    kwargs = dict(uvicorn_kwargs or {})  # TLS and logging flags (server/cli_vllm.py)
    scheme = "https" if kwargs.get("ssl_certfile") else "http"
    root = "/" + server_config.root_path.strip("/") if server_config.root_path else ""
    ready = (
        f"tokenmill: serving {engine.model_name} at "
        f"{scheme}://{server_config.host}:{server_config.port}{root} "
        f"(KV cache {kv_tokens} tokens, max_model_len {engine.max_model_len})"
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            # NOTE: the loaded model, tokenizer and libraries are ~240k objects that a full
            # collection would scan, holding the GIL ~0.4 s on a busy 2-core machine (a /health
            # stall); frozen, later collections scan only what serving allocates
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
    server = Server(config)
    # NOTE: the engine steps on this (main) thread, where torch's kernels run fastest, and uvicorn
    # serves from its own thread (it installs no signal handlers there). Our handlers call its
    # handle_exit (which sse-starlette hooks to cut streams after their grace period); the
    # lifespan then drains and stops the engine, and run_forever() returns.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: server.handle_exit(signum, frame))

    def run_server() -> None:
        try:
            server.run()
        finally:
            engine.stop()  # the lifespan stopped it already, unless uvicorn never started

    # NOTE: the step thread holds the GIL between kernels; a 1 ms switch interval (5 ms default)
    # lets the event loop take it back sooner, keeping /health and stream latency low.
    sys.setswitchinterval(0.001)
    http = threading.Thread(target=run_server, name="tokenmill-http")
    http.start()
    engine.run_forever()
    if engine.fatal_error is not None:
        # NOTE: the engine cannot serve again (dead TP worker, persistent step failures): every
        # request in flight got its error; shut the HTTP side down the graceful way (so those
        # error bodies and events reach their clients) and exit non-zero, so that Docker's
        # restart policy or Kubernetes restarts the process.
        logger.error("exiting: the engine failed: %s", engine.fatal_error)
        # NOTE: /health answers 503 with the reason (e.g. the lost rank) for a moment first,
        # so that probes and operators see why (SIGTERM/Ctrl-C cut it short)
        http.join(FATAL_HEALTH_GRACE_S)
        server.should_exit = True
    while http.is_alive():
        http.join(0.5)
    if engine.fatal_error is not None:
        return 1
    return 0 if server.started else 1


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
