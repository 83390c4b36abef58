"""The CLI as a process: a bad model path or flag exits non-zero with a message, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server", *argv], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.timeout(150)
def test_missing_model_exits_1_with_a_message(tmp_path) -> None:
    proc = run("serve", str(tmp_path / "no-such-model"), "--port", "1")
    assert proc.returncode == 1
    assert "cannot load the model" in proc.stderr and "no-such-model" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(60)
def test_help_and_bad_flags() -> None:
    help_text = run("serve", "--help").stdout
    for flag in ("--served-model-name", "--api-key", "--max-model-len", "--max-num-seqs",
                 "--max-num-batched-tokens", "--kv-cache-memory", "--block-size",
                 "--tensor-parallel-size", "--dtype", "--seed", "--max-waiting", "--log-level",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--tokenizer",
                 "--revision", "--download-dir", "--generation-config", "--allowed-origins",
                 "--ssl-keyfile", "--root-path", "--enable-log-requests", "--max-log-len",
                 "--disable-log-stats", "--uvicorn-log-level"):  # fmt: skip
        assert flag in help_text
    bad = run("serve", "--kv-cache-memory", "lots")
    assert bad.returncode == 2 and "kv-cache-memory" in bad.stderr


@pytest.mark.timeout(150)
def test_uncached_repo_id_names_where_it_looked(tmp_path) -> None:
    """No network: a repo id missing from the HF cache is an error naming the cache folder."""
    proc = run("serve", "org/absent-model", "--port", "1", env={"HF_HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert "cannot load the model" in proc.stderr
    assert str(tmp_path / "hub" / "models--org--absent-model") in proc.stderr
    assert "Traceback" not in proc.stderr
