"""A tiny Llama-shaped Q4_0 GGUF from benchmarks/make_llama_gguf.py, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import TINY, mk


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: str) -> Path:
    out = tmp_path_factory.mktemp("llama_gguf") / "tiny-q4_0.gguf"
    mk.write_gguf(out, "q4_0", 0, smollm2_gguf, TINY, mk.DEFAULT_EMBD_TYPE["q4_0"])
    return out
