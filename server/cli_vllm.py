"""The flags beyond the engine's: model source, generation defaults, HTTP (CORS, TLS, root path),
logging and request limits, with vLLM's names, value formats and meaning; and their types."""

from __future__ import annotations

import argparse
import json
import os
import ssl
from dataclasses import fields
from typing import Any

from scheduler.config import DEFAULT_MAX_PENDING_OUTPUTS, parse_size
from server.limits import ServingLimits

UVICORN_LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical")


def _json_list(flag: str):
    """vLLM's format for the CORS lists: a JSON list of strings, e.g. '["https://a.example"]'."""

    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(
                f"{flag} takes a JSON list of strings, e.g. '[\"https://app.example\"]', "
                f"got {text!r}"
            )
        return value

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _generation_config(text: str) -> str:
    if text in ("auto", "vllm") or os.path.isdir(text):
        return text
    raise argparse.ArgumentTypeError(
        f"must be auto, vllm or a folder holding generation_config.json, got {text!r}"
    )


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _cert_reqs(text: str) -> int:
    value = int(text)
    allowed = (ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED)
    if value not in allowed:
        raise argparse.ArgumentTypeError(
            f"must be 0 (none), 1 (optional) or 2 (required), got {value}"
        )
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def size(text: str) -> int:
    """A byte size such as 2GiB, 512MiB or 1000000."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 byte, got {text!r}")
    return value


def add_vllm_flags(s: argparse.ArgumentParser) -> None:
    """Add the flags to the `serve` parser."""
    m = s.add_argument_group("model source (vLLM)")
    m.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder, .gguf file or cached repo id (default: the model's)",
    )
    m.add_argument("--revision", default=None, help="revision of a repo-id model (default: main)")
    m.add_argument("--tokenizer-revision", default=None, help="revision of a repo-id tokenizer")
    m.add_argument(
        "--download-dir",
        default=None,
        help="Hugging Face hub cache to look in (default: $HF_HUB_CACHE or $HF_HOME/hub); "
        "tokenmill never downloads",
    )
    m.add_argument(
        "--generation-config",
        type=_generation_config,
        default="auto",
        help="request defaults: auto (the model's generation_config.json), vllm (none), or a "
        "folder holding a generation_config.json",
    )
    m.add_argument(
        "--override-generation-config",
        type=_json_object,
        default=None,
        help="JSON merged over the generation config, e.g. '{\"temperature\": 0.5}'",
    )
    h = s.add_argument_group("HTTP (vLLM)")
    h.add_argument(
        "--allowed-origins",
        type=_json_list("--allowed-origins"),
        default=None,
        help="CORS origins as a JSON list, e.g. '[\"https://app.example\"]' or '[\"*\"]' "
        '(default: no CORS headers; vLLM\'s default is ["*"])',
    )
    h.add_argument("--allowed-methods", type=_json_list("--allowed-methods"), default=["*"])
    h.add_argument("--allowed-headers", type=_json_list("--allowed-headers"), default=["*"])
    h.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    h.add_argument("--ssl-keyfile", type=_existing_file, default=None)
    h.add_argument("--ssl-certfile", type=_existing_file, default=None)
    h.add_argument("--ssl-ca-certs", type=_existing_file, default=None)
    h.add_argument(
        "--ssl-cert-reqs",
        type=_cert_reqs,
        default=int(ssl.CERT_NONE),
        help="client certificates: 0 none, 1 optional, 2 required (with --ssl-ca-certs)",
    )
    h.add_argument(
        "--root-path", default="", help="path prefix when served behind a path-routing proxy"
    )
    g = s.add_argument_group("logging (vLLM)")
    g.add_argument(
        "--uvicorn-log-level",
        choices=UVICORN_LOG_LEVELS,
        default=None,
        help="uvicorn's log level (default: --log-level)",
    )
    g.add_argument("--disable-uvicorn-access-log", action="store_true")
    g.add_argument(
        "--disable-log-stats", action="store_true", help="no 10 s throughput summary in the log"
    )
    g.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log every request with its prompt (prompts are never logged otherwise)",
    )
    g.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="accepted for old vLLM scripts: requests are not logged unless asked",
    )
    g.add_argument(
        "--max-log-len",
        type=positive,
        default=None,
        help="prompt characters and token ids a logged request shows (default: all)",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="accepted for vLLM scripts: usage.prompt_tokens_details is always sent",
    )


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """The `tokenmill serve` flags for ServingLimits (vLLM-style names; see README's table)."""
    d = ServingLimits()
    g = parser.add_argument_group("request limits (a request over one gets a 400/413 naming it)")
    g.add_argument(
        "--max-waiting",
        type=positive,
        default=None,
        help="sequences (prompts x n) that may wait for a slot before new requests get 503 + "
        "Retry-After (default: one per KV cache block, at least 2 x --max-num-seqs)",
    )
    g.add_argument(
        "--max-request-body-size",
        type=size,
        default=d.max_request_body_size,
        help="largest request body, e.g. 16MiB (default 4MiB); 413 past it",
    )
    g.add_argument("--max-prompts-per-request", type=positive, default=d.max_prompts_per_request)
    g.add_argument("--max-n", type=positive, default=d.max_n, help="largest n (samples)")
    g.add_argument("--max-stop-strings", type=non_negative, default=d.max_stop_strings)
    g.add_argument("--max-stop-string-length", type=positive, default=d.max_stop_string_length)
    g.add_argument("--max-logit-bias", type=non_negative, default=d.max_logit_bias)
    g.add_argument(
        "--max-tokens-limit",
        type=positive,
        default=None,
        help="largest max_tokens a request may ask for (default: max_model_len)",
    )
    g.add_argument(
        "--max-logprobs",
        type=non_negative,
        default=d.max_logprobs,
        help="largest logprobs (completions) / top_logprobs (chat)",
    )
    g.add_argument(
        "--max-pending-outputs",
        type=positive,
        default=DEFAULT_MAX_PENDING_OUTPUTS,
        help="stream outputs a slow client may leave unread before its request is aborted",
    )


def limits_from_args(args: argparse.Namespace) -> ServingLimits:
    """Every ServingLimits field that is a flag (same name), the rest at its default."""
    given = {f.name: getattr(args, f.name) for f in fields(ServingLimits) if hasattr(args, f.name)}
    return ServingLimits(**given)


def http_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig fields from the flags; raises ValueError for combinations that cannot work."""
    if args.enable_log_requests and args.disable_log_requests:
        raise ValueError("--enable-log-requests and --disable-log-requests contradict each other")
    if args.allow_credentials and args.allowed_origins and "*" in args.allowed_origins:
        raise ValueError(
            "--allow-credentials needs explicit --allowed-origins: browsers refuse credentials "
            "with the wildcard origin '*'"
        )
    return {
        "allowed_origins": tuple(args.allowed_origins or ()),
        "allowed_methods": tuple(args.allowed_methods),
        "allowed_headers": tuple(args.allowed_headers),
        "allow_credentials": args.allow_credentials,
        "root_path": args.root_path,
        "enable_log_requests": args.enable_log_requests,
        "max_log_len": args.max_log_len,
        "log_stats": not args.disable_log_stats,
    }


def uvicorn_settings(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config keywords for TLS and logging; raises ValueError for half a TLS set-up."""
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("TLS needs both --ssl-keyfile and --ssl-certfile")
    if args.ssl_cert_reqs != ssl.CERT_NONE and not args.ssl_ca_certs:
        raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs to check client certificates")
    settings: dict[str, Any] = {
        "log_level": args.uvicorn_log_level,
        "access_log": not args.disable_uvicorn_access_log,
    }
    if args.ssl_certfile:
        settings.update(
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
        )
    return settings
