"""Every `tokenmill serve` / `worker` flag (vLLM's names, value formats and meaning; README's
tables say more), their types, and parsed flags → EngineConfig + ServerConfig + uvicorn kwargs."""

from __future__ import annotations

import argparse
import json
import os
import ssl
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from scheduler.config import (
    ACTIVATION_DTYPES,
    DEFAULT_MAX_PENDING_OUTPUTS,
    DTYPES,
    QUANTIZATIONS,
    EngineConfig,
    parse_size,
)
from server.config import ServerConfig
from server.limits import ServingLimits
from server.reasoning import REASONING_PARSERS
from server.tool_parsers import TOOL_PARSERS

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _arg_type(convert: Callable[[str], Any], ok: Callable[[Any], bool], want: str) -> Callable:
    """An argparse type: `convert`, then `ok`; either failing is an error saying what it wants."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:  # json.JSONDecodeError too
            value = None
        else:
            if ok(value):
                return value
        raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")

    return parse


positive = _arg_type(int, lambda v: v >= 1, ">= 1")
non_negative = _arg_type(int, lambda v: v >= 0, ">= 0")
size = _arg_type(parse_size, lambda v: v is not None and v >= 1, "a size >= 1 byte (2GiB, 512MiB)")
json_list = _arg_type(
    json.loads,
    lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    "a JSON list of strings, e.g. '[\"https://app.example\"]'",
)
json_object = _arg_type(json.loads, lambda v: isinstance(v, dict), "a JSON object")
generation_config = _arg_type(
    str,
    lambda v: v in ("auto", "vllm") or os.path.isdir(v),
    "auto, vllm or a folder holding generation_config.json",
)
existing_file = _arg_type(str, os.path.isfile, "an existing file")
cert_reqs = _arg_type(int, lambda v: v in (0, 1, 2), "0 (none), 1 (optional) or 2 (required)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenmill", description="An OpenAI-compatible LLM server."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_flags(sub.add_parser("serve", help="serve a model over the OpenAI API"))
    worker = "run this host's tensor-parallel ranks for the head's `serve` (no HTTP; same flags)"
    add_flags(sub.add_parser("worker", help=worker))
    return parser


def add_flags(s: argparse.ArgumentParser) -> None:
    """serve's flags; `worker` takes them too, so one command line works with another rank."""
    for add in (_engine, _parsers, _model_source, _http, _logging, _limits):  # --help's order
        add(s)


def _engine(s: argparse.ArgumentParser) -> None:
    """The ungrouped flags: the model, where it listens, the scheduler's limits, the KV cache,
    parallelism, dtypes and the device."""
    env = os.environ.get  # torchrun's variables are the multi-host defaults
    s.add_argument("model", nargs="?", help="HF folder, .gguf or cached repo id (default: SmolLM2)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", help="names in the API (first: metrics)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` (or TOKENMILL_API_KEY)")
    s.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs or /openapi.json")
    s.add_argument("--max-model-len", type=positive, help="default: the model's, KV-capped")
    s.add_argument("--max-num-seqs", type=positive, help="default: 256 on CUDA, 32 on CPU")
    s.add_argument("--max-num-batched-tokens", type=positive, help="default: 2048; 1024 on CPU")
    s.add_argument("--kv-cache-memory", type=size, help="e.g. 2GiB (default: sized to the host)")
    s.add_argument("--block-size", type=positive, default=16)
    s.add_argument("--tensor-parallel-size", "-tp", type=positive, default=1)
    s.add_argument("--nnodes", type=positive, default=int(env("WORLD_SIZE", 1)), help="hosts")
    s.add_argument("--node-rank", type=int, default=int(env("RANK", 0)), help="0: the head")
    s.add_argument("--master-addr", default=env("MASTER_ADDR", "127.0.0.1"), help="the head")
    s.add_argument("--master-port", type=int, default=int(env("MASTER_PORT", 0)))
    s.add_argument("--distributed-timeout", type=float, default=300.0, help="s for hosts to join")
    s.add_argument("--cluster-secret", help="proven by every host on joining (or, unseen by ps, "
                   "TOKENMILL_CLUSTER_SECRET); needed with --nnodes > 1")  # fmt: skip
    s.add_argument("--dtype", choices=DTYPES, default="auto")
    s.add_argument("--quantization", "-q", choices=QUANTIZATIONS, help="default: the file's")
    s.add_argument("--kv-cache-dtype", choices=DTYPES, default="auto")
    s.add_argument(
        "--activation-dtype",
        choices=ACTIVATION_DTYPES,
        default="auto",
        help="int8: packed blocks times 8-bit activations (auto on CPU); float32: exact path",
    )
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    s.add_argument(
        "--runner", choices=("generate", "pooling"), default="generate", help="pooling: embed"
    )
    s.add_argument("--pooler-config", type=json_object, help='{"pooling_type": "MEAN", ...}')
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--speculative-config",
        type=json_object,
        help='\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, '
        '"prompt_lookup_min": 2}\': prompt lookup, verified exactly',
    )
    s.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--chat-template", help="a Jinja chat template file that replaces the model's")
    s.add_argument("--shutdown-timeout", type=float, default=10.0, help="s to drain on SIGTERM")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def _parsers(s: argparse.ArgumentParser) -> None:
    t = s.add_argument_group("reasoning and tool calls (vLLM)")
    why = "split <think>…</think> off replies into message.reasoning"
    t.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), help=why)
    why = "parse and enforce the model's own tool-call format"
    t.add_argument("--tool-call-parser", choices=sorted(TOOL_PARSERS), help=why)
    why = "allow tool_choice auto with --tool-call-parser"
    t.add_argument("--enable-auto-tool-choice", action="store_true", help=why)


def _model_source(s: argparse.ArgumentParser) -> None:
    m = s.add_argument_group("model source (vLLM)")
    m.add_argument("--tokenizer", help="folder, .gguf or cached repo id (default: the model's)")
    m.add_argument("--revision", help="of a repo-id model (default: main)")
    m.add_argument("--tokenizer-revision")
    m.add_argument("--download-dir", help="HF hub cache to look in (tokenmill never downloads)")
    m.add_argument("--generation-config", type=generation_config, default="auto")
    m.add_argument("--override-generation-config", type=json_object, help="JSON merged over it")


def _http(s: argparse.ArgumentParser) -> None:
    h = s.add_argument_group("HTTP (vLLM)")
    h.add_argument("--allowed-origins", type=json_list, help="CORS, e.g. '[\"*\"]' (default none)")
    h.add_argument("--allowed-methods", type=json_list, default=["*"])
    h.add_argument("--allowed-headers", type=json_list, default=["*"])
    h.add_argument("--allow-credentials", action="store_true")
    for name in ("--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs"):
        h.add_argument(name, type=existing_file)
    h.add_argument("--ssl-cert-reqs", type=cert_reqs, default=int(ssl.CERT_NONE))
    h.add_argument("--root-path", default="", help="path prefix of a path-routing proxy")


def _logging(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("logging (vLLM)")
    g.add_argument("--uvicorn-log-level", choices=("trace", *LOG_LEVELS))
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument("--disable-log-stats", action="store_true", help="no 10 s summary line")
    g.add_argument("--enable-log-requests", action="store_true", help="log prompts (user data)")
    g.add_argument("--disable-log-requests", action="store_true", help="the default (old scripts)")
    g.add_argument("--max-log-len", type=positive, help="prompt chars and ids logged (4096)")
    g.add_argument("--enable-prompt-tokens-details", action="store_true", help="always on")
    g.add_argument(
        "--disable-vllm-metrics", action="store_true", help="no vllm:* gauges on /metrics"
    )


def _limits(s: argparse.ArgumentParser) -> None:
    d = ServingLimits()
    r = s.add_argument_group("request limits (a request over one gets a 400/413 naming it)")
    r.add_argument("--max-waiting", type=positive, help="queued sequences before 503 (KV blocks)")
    r.add_argument("--max-request-body-size", type=size, default=d.max_request_body_size)
    r.add_argument("--max-prompts-per-request", type=positive, default=d.max_prompts_per_request)
    r.add_argument("--max-n", type=positive, default=d.max_n)
    r.add_argument("--max-stop-strings", type=non_negative, default=d.max_stop_strings)
    r.add_argument("--max-stop-string-length", type=positive, default=d.max_stop_string_length)
    r.add_argument("--max-logit-bias", type=non_negative, default=d.max_logit_bias)
    r.add_argument("--max-tokens-limit", type=positive, help="default: max_model_len")
    r.add_argument("--max-logprobs", type=non_negative, default=d.max_logprobs)
    c = ServerConfig()
    kept = "/v1/responses kept (store: true); least recently used go first"
    r.add_argument("--max-stored-responses", type=non_negative, default=c.max_stored_responses,
                   help=kept)  # fmt: skip
    r.add_argument(
        "--max-stored-responses-bytes",
        type=size,
        default=c.max_stored_responses_bytes,
        help="their JSON, all together",
    )
    r.add_argument("--max-pending-outputs", type=positive, default=DEFAULT_MAX_PENDING_OUTPUTS)


def _pick(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` from the flags named as its fields; `given` overrides."""
    picked = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**picked | given)


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """Parsed flags → the two configs; raises ValueError for combinations that cannot work."""
    if args.enable_log_requests and args.disable_log_requests:
        raise ValueError("--enable-log-requests and --disable-log-requests contradict each other")
    if args.allow_credentials and args.allowed_origins and "*" in args.allowed_origins:
        raise ValueError(
            "--allow-credentials needs explicit --allowed-origins: browsers refuse credentials "
            "with the wildcard origin '*'"
        )
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (the model's format)")
    names = tuple(dict.fromkeys(args.served_model_name or ()))
    engine_config = _pick(
        EngineConfig,
        args,
        served_model_name=names[0] if names else None,
        cluster_secret=args.cluster_secret or os.environ.get("TOKENMILL_CLUSTER_SECRET") or None,
    )
    server_config = _pick(
        ServerConfig,
        args,
        api_key=args.api_key or os.environ.get("TOKENMILL_API_KEY") or None,
        model_path=args.model,
        chat_template=_read_template(args.chat_template),
        limits=_pick(ServingLimits, args),
        served_model_names=names,
        allowed_origins=tuple(args.allowed_origins or ()),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers),
        log_stats=not args.disable_log_stats,
        vllm_metrics=not args.disable_vllm_metrics,
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


def uvicorn_settings(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config keywords for TLS and logging; raises ValueError for half a TLS set-up."""
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
    if args.ssl_cert_reqs != ssl.CERT_NONE and not args.ssl_ca_certs:
        raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs to check client certificates")
    settings = {
        "log_level": args.uvicorn_log_level,
        "access_log": not args.disable_uvicorn_access_log,
    }
    if args.ssl_certfile:
        keys = ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs")
        settings.update({k: getattr(args, k) for k in keys})
    return settings
