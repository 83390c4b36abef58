"""`tokenmill serve` flags → EngineConfig + ServerConfig (no model is loaded)."""

from __future__ import annotations

import pytest

from server.cli import configs, main, make_parser
from server.flags import uvicorn_settings

pytestmark = pytest.mark.timeout(10)


def parse(*argv: str):
    return configs(make_parser().parse_args(["serve", *argv]))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    engine, server = parse()
    assert engine.model is None  # the embedded SmolLM2 GGUF
    assert (server.host, server.port, server.api_key, server.limits.max_waiting) == (
        "127.0.0.1",
        8000,
        None,
        None,
    )
    assert engine.enable_prefix_caching and engine.tensor_parallel_size == 1


def test_every_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    engine, server = parse(
        "/models/x",
        "--host", "0.0.0.0", "--port", "9001", "--served-model-name", "x1",
        "--api-key", "k", "--max-model-len", "1024", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "512", "--kv-cache-memory", "2GiB", "--block-size", "32",
        "--tensor-parallel-size", "2", "--dtype", "bfloat16", "--seed", "7",
        "--max-waiting", "3", "--no-enable-prefix-caching", "--device", "cpu",
        "--shutdown-timeout", "4", "--log-level", "debug",
    )  # fmt: skip
    assert engine.model == "/models/x" and engine.served_model_name == "x1"
    assert (engine.max_model_len, engine.max_num_seqs, engine.max_num_batched_tokens) == (
        1024,
        8,
        512,
    )
    assert engine.kv_cache_memory == 2 * 1024**3 and engine.block_size == 32
    assert (engine.tensor_parallel_size, engine.dtype, engine.seed) == (2, "bfloat16", 7)
    assert not engine.enable_prefix_caching
    assert (server.host, server.port, server.api_key, server.limits.max_waiting) == (
        "0.0.0.0",
        9001,
        "k",
        3,
    )
    assert server.shutdown_timeout == 4.0


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_API_KEY", "from-env")
    assert parse()[1].api_key == "from-env"
    assert parse("--api-key", "flag")[1].api_key == "flag"


@pytest.mark.parametrize(
    "argv",
    [
        ["--kv-cache-memory", "lots"],
        ["--max-num-seqs", "0"],
        ["--dtype", "int3"],
        ["--max-waiting", "-1"],
        ["--port", "http"],
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_chat_template_file(tmp_path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    _, server = parse("--chat-template", str(path))
    assert server.chat_template == "{{ messages[0].content }}"
    assert parse()[1].chat_template is None
    with pytest.raises(SystemExit, match="missing.jinja"):
        parse("--chat-template", str(tmp_path / "missing.jinja"))


def test_vllm_flags(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")
    args = make_parser().parse_args([
        "serve", "org/model", "--served-model-name", "a", "b", "a",
        "--tokenizer", "org/tok", "--revision", "v1", "--tokenizer-revision", "v2",
        "--download-dir", "/hub", "--generation-config", "vllm",
        "--override-generation-config", '{"temperature": 0.5}',
        "--allowed-origins", '["https://a.example"]', "--allowed-methods", '["GET", "POST"]',
        "--allowed-headers", '["authorization"]', "--allow-credentials",
        "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/api",
        "--uvicorn-log-level", "trace", "--disable-uvicorn-access-log", "--disable-log-stats",
        "--enable-log-requests", "--max-log-len", "40", "--enable-prompt-tokens-details",
    ])  # fmt: skip
    engine, server = configs(args)
    assert (engine.model, engine.served_model_name, server.served_model_names) == (
        "org/model", "a", ("a", "b"),
    )  # fmt: skip
    assert (engine.tokenizer, engine.revision, engine.tokenizer_revision) == ("org/tok", "v1", "v2")
    assert engine.download_dir == "/hub" and engine.generation_config == "vllm"
    assert engine.override_generation_config == {"temperature": 0.5}
    assert server.allowed_origins == ("https://a.example",)
    assert server.allowed_methods == ("GET", "POST")
    assert server.allowed_headers == ("authorization",)
    assert server.allow_credentials and server.root_path == "/api"
    assert server.enable_log_requests and server.max_log_len == 40 and not server.log_stats
    assert uvicorn_settings(args) == {
        "log_level": "trace", "access_log": False, "ssl_keyfile": str(key),
        "ssl_certfile": str(cert), "ssl_ca_certs": None, "ssl_cert_reqs": 0,
    }  # fmt: skip


def test_vllm_flag_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    args = make_parser().parse_args(["serve"])
    engine, server = configs(args)
    assert engine.generation_config == "auto" and engine.tokenizer is None
    assert server.allowed_origins == () and server.root_path == "" and server.log_stats
    assert not server.enable_log_requests and server.served_model_names == ()
    assert uvicorn_settings(args) == {"log_level": None, "access_log": True}


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--allowed-origins", "https://a.example"], "--allowed-origins"),
        (["--allowed-methods", '{"GET": 1}'], "--allowed-methods"),
        (["--generation-config", "/no/such/folder"], "--generation-config"),
        (["--override-generation-config", "[1]"], "--override-generation-config"),
        (["--ssl-certfile", "/no/such.pem"], "--ssl-certfile"),
        (["--ssl-cert-reqs", "3"], "--ssl-cert-reqs"),
        (["--uvicorn-log-level", "loud"], "--uvicorn-log-level"),
        (["--max-log-len", "0"], "--max-log-len"),
        (["--served-model-name"], "--served-model-name"),
        (["--runner", "embed"], "--runner"),
        (["--pooler-config", "[1]"], "--pooler-config"),
    ],
)
def test_bad_vllm_flags_exit_2_naming_them(argv, named, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ssl-certfile", __file__], "both --ssl-keyfile and --ssl-certfile"),
        (["--ssl-keyfile", __file__, "--ssl-certfile", __file__, "--ssl-cert-reqs", "2"],
         "--ssl-ca-certs"),
        (["--allow-credentials", "--allowed-origins", '["*"]'], "--allow-credentials"),
        (["--enable-log-requests", "--disable-log-requests"], "contradict"),
    ],
)  # fmt: skip
def test_contradictory_vllm_flags_exit_2(argv, message, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_response_store_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    _, server = parse()
    assert (server.max_stored_responses, server.max_stored_responses_bytes) == (1000, 64 * 2**20)
    _, server = parse("--max-stored-responses", "0", "--max-stored-responses-bytes", "1MiB")
    assert (server.max_stored_responses, server.max_stored_responses_bytes) == (0, 2**20)
    with pytest.raises(SystemExit):
        parse("--max-stored-responses", "-1")


def test_pooling_runner_flags() -> None:
    engine, _ = parse("--runner", "pooling", "--pooler-config", '{"pooling_type": "MEAN"}')
    assert (engine.runner, engine.pooler_config) == ("pooling", {"pooling_type": "MEAN"})
    assert (parse()[0].runner, parse()[0].pooler_config) == ("generate", None)


def test_speculative_config_flag() -> None:
    """vLLM's JSON, validated at start-up with the numbers in the message."""
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'
    engine, _ = parse("--speculative-config", spec)
    assert engine.speculative_config == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
    }
    assert parse()[0].speculative_config is None
    with pytest.raises(ValueError, match="num_speculative_tokens must be 1..32, got 0"):
        parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}')
    with pytest.raises(ValueError, match="method 'eagle' is not supported"):
        parse("--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}')
    with pytest.raises(ValueError, match=r"prompt_lookup_min \(3\) <= prompt_lookup_max \(2\)"):
        parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, '
              '"prompt_lookup_min": 3, "prompt_lookup_max": 2}')  # fmt: skip
    with pytest.raises(SystemExit):
        parse("--speculative-config", "[1]")
