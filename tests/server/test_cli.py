"""`tokenmill serve` flags → EngineConfig + ServerConfig (no model is loaded)."""

from __future__ import annotations

import pytest

from server.cli import configs, make_parser

pytestmark = pytest.mark.timeout(10)


def parse(*argv: str):
    return configs(make_parser().parse_args(["serve", *argv]))


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    engine, server = parse()
    assert engine.model is None  # the embedded SmolLM2 GGUF
    assert (server.host, server.port, server.api_key, server.max_waiting) == (
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
    assert not engine.enable_prefix_caching and engine.max_waiting == 3
    assert (server.host, server.port, server.api_key, server.max_waiting) == (
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
