"""Shared by the benchmark-script tests: the scripts as modules and a tiny Llama shape."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import make_llama_gguf as mk  # noqa: E402

# Llama-3.2-1B's proportions at a size a test writes in seconds (hidden a multiple of 256, so
# the tied embedding is Q6_K as llama-quantize makes it).
TINY = mk.LlamaShape(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    intermediate_size=512,
)
