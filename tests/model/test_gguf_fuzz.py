"""Hostile GGUF files: any bytes, or a valid file with its header bytes mutated, give a
ValueError naming the file (or load consistently), never another exception or a large
allocation; header sizes are checked against the file and the config first."""

from __future__ import annotations

import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.config import ModelConfig
from model.gguf_reader import read_gguf
from model.gguf_weights import load_gguf

pytestmark = pytest.mark.timeout(60)

MAX_PEAK_BYTES = 32 * 1024 * 1024  # Python + numpy allocations while one example loads
DIMS = dict(vocab=32, hidden=8, heads=2, kv=1, inter=16, layers=1)


def tiny_gguf(dims: dict[str, int] = DIMS, **override: int) -> bytes:
    """A complete, consistent llama GGUF of a few KB (every tensor its header implies)."""
    d = dims
    head_dim = d["hidden"] // d["heads"]
    meta = dict(block_count=d["layers"], embedding_length=d["hidden"], head_count=d["heads"],
                head_count_kv=d["kv"], feed_forward_length=d["inter"], vocab_size=d["vocab"],
                context_length=64) | override  # fmt: skip
    keys = {"head_count": "attention.head_count", "head_count_kv": "attention.head_count_kv"}
    shapes = {"token_embd.weight": (d["vocab"], d["hidden"]), "output_norm.weight": (d["hidden"],)}
    for i in range(d["layers"]):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (d["hidden"],), f"blk.{i}.ffn_norm.weight": (d["hidden"],),
            f"blk.{i}.attn_q.weight": (d["heads"] * head_dim, d["hidden"]),
            f"blk.{i}.attn_k.weight": (d["kv"] * head_dim, d["hidden"]),
            f"blk.{i}.attn_v.weight": (d["kv"] * head_dim, d["hidden"]),
            f"blk.{i}.attn_output.weight": (d["hidden"], d["heads"] * head_dim),
            f"blk.{i}.ffn_gate.weight": (d["inter"], d["hidden"]),
            f"blk.{i}.ffn_up.weight": (d["inter"], d["hidden"]),
            f"blk.{i}.ffn_down.weight": (d["hidden"], d["inter"]),
        }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.gguf")
        w = gguf.GGUFWriter(path, "llama")
        for key, value in meta.items():
            add = w.add_uint32 if value < 1 << 32 else w.add_uint64
            add(f"llama.{keys.get(key, key)}", value)
        for name, shape in shapes.items():
            w.add_tensor(name, np.full(shape, 0.5, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return Path(path).read_bytes()


VALID = tiny_gguf()


def load_bytes(data: bytes, name: str = "fuzz.gguf") -> None:
    """load_gguf + ModelConfig on `data`: fine, or a ValueError naming the file or the config;
    any other exception, or a peak allocation over MAX_PEAK_BYTES, fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        Path(path).write_bytes(data)
        tracemalloc.start()
        try:
            ckpt = load_gguf(path)
            ModelConfig.from_hf_dict(ckpt.config)
            for tensor_name in ckpt.tensor_names():
                ckpt.get(tensor_name)
        except ValueError as e:
            assert name in str(e) or "config of" in str(e), e
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"{peak} bytes allocated"


def test_the_tiny_file_loads() -> None:
    load_bytes(VALID)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.gguf")
        Path(path).write_bytes(VALID)
        cfg = ModelConfig.from_hf_dict(load_gguf(path).config)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (32, 8, 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (dict(block_count=1 << 20), r"llama.block_count is 1048576, not in \[1, 4096\]"),
        (dict(block_count=3), "block_count 3, but it holds tensors of 1 layers"),
        (dict(vocab_size=1 << 40), "vocabulary size"),
        (dict(vocab_size=64), r"embed_tokens.weight is \[32, 8\], its header says \[64, 8\]"),
        (dict(head_count=0), r"llama.attention.head_count is 0, not in \[1, 16777216\]"),
        (dict(head_count_kv=0), r"head_count_kv is 0, not in \[1, 16777216\]"),
        (dict(head_count_kv=3), "head_count 2 is not a multiple of head_count_kv 3"),
        (dict(head_count=3), "embedding_length 8 is not divisible by head_count 3"),
        (dict(embedding_length=1 << 30), "embedding_length is 1073741824"),
        (
            dict(feed_forward_length=1 << 20),
            r"gate_proj.weight is \[16, 8\], its header says \[1048576, 8\]",
        ),
    ],
)
def test_header_sizes_are_checked_against_the_file(override, message) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sizes.gguf")
        Path(path).write_bytes(tiny_gguf(**override))
        with pytest.raises(ValueError, match=message):
            load_gguf(path)


def test_nested_arrays_and_many_dims_are_value_errors() -> None:
    nested = struct.pack("<4sIQQQ1s", b"GGUF", 3, 0, 1, 1, b"k")
    nested += struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 2000  # arrays of arrays of ...
    dims = struct.pack("<4sIQQQ1sI", b"GGUF", 3, 1, 0, 1, b"t", 1 << 31) + b"\0" * 64
    with tempfile.TemporaryDirectory() as tmp:
        for data, message in ((nested, "arrays nested deeper than 4"),
                              (dims, "tensor t has 2147483648 dimensions > 4")):  # fmt: skip
            path = os.path.join(tmp, "x.gguf")
            Path(path).write_bytes(data)
            with pytest.raises(ValueError, match=message):
                read_gguf(path)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_are_a_value_error(data: bytes) -> None:
    load_bytes(data)


@FUZZ
@given(st.binary(max_size=256).map(lambda b: struct.pack("<4sI", b"GGUF", 3) + b))
def test_any_header_after_the_magic_is_a_value_error(data: bytes) -> None:
    load_bytes(data)


HEADER_END = len(VALID) - sum(4 * n for n in (32 * 8, 8, 8, 8, 8 * 8, 4 * 8, 4 * 8, 8 * 8,
                                                 16 * 8, 16 * 8, 8 * 16))  # fmt: skip


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.sampled_from([None, 1, 2, 4, 8]),
)
def test_mutated_headers_are_value_errors_or_load(edits: list, word: int | None) -> None:
    """Bytes of a valid file's header (counts, lengths, types, dims, offsets, sizes) changed:
    single bytes, or a whole little-endian word set to all ones."""
    data = bytearray(VALID)
    for pos, value in edits:
        if word is None:
            data[pos] = value
        else:
            data[pos : pos + word] = b"\xff" * len(data[pos : pos + word])
    load_bytes(bytes(data))
