"""The vLLM flags beyond the engine's: model source, generation defaults, HTTP (CORS, TLS, root
path) and logging, with vLLM's names, value formats and meaning."""

from __future__ import annotations

import argparse
import json
import os
import ssl
from typing import Any

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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
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
        type=_positive,
        default=None,
        help="prompt characters and token ids a logged request shows (default: all)",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="accepted for vLLM scripts: usage.prompt_tokens_details is always sent",
    )


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
