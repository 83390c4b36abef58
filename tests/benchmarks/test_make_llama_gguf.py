"""benchmarks/make_llama_gguf.py: valid Q6_K, llama-quantize's types, a GGUF tokenmill loads."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from bench_helpers import TINY, mk

from model.gguf_weights import load_gguf

pytestmark = pytest.mark.timeout(120)


def test_q6_k_blocks_decode_with_gguf_dequantizer() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 512), dtype=np.float32) * 0.02
    x[1, :16] = 0.0  # a zero group beside non-zero ones
    x[2, :256] = 0.0  # a whole zero super-block
    x[3] = np.abs(x[3])  # all positive: the extreme's sign flips the scale
    packed = mk.quantize_q6_k(x)
    assert packed.shape == (8, 2 * 210) and packed.dtype == np.uint8
    y = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q6_K)
    assert np.all(y[2, :256] == 0) and np.all(y[1, :16] == 0)
    # 6 bits per value: the error is at most one step of its 16-value group (its extreme / 32,
    # plus the int8 rounding of the group scale), and well below Q4_0's.
    group_amax = np.abs(x.reshape(-1, 16)).max(axis=1, keepdims=True)
    block_amax = np.repeat(np.abs(x.reshape(-1, 256)).max(axis=1), 16)[:, None]
    step = (group_amax + block_amax / 127) / 32 * 1.01
    assert np.all(np.abs(y - x).reshape(-1, 16) <= step)
    q4 = gguf.quants.dequantize(
        gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0
    )
    rmse = np.sqrt(np.mean((y - x) ** 2))
    assert 0 < rmse < np.sqrt(np.mean((q4 - x) ** 2)) / 3


def test_chunking_never_changes_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = mk.generate("token_embd.weight", (40, 256), "q6_k", 0.02, seed=7)
    monkeypatch.setattr(mk, "EMBD_CHUNK_ROWS", 3)
    assert np.array_equal(mk.generate("token_embd.weight", (40, 256), "q6_k", 0.02, seed=7), whole)
    assert not np.array_equal(mk.generate("token_embd.weight", (40, 256), "q6_k", 0.02, 8), whole)


@pytest.mark.parametrize(("kind", "embd"), [("q4_0", "q6_k"), ("q8_0", "q8_0")])
def test_tensor_types_follow_llama_quantize(kind: str, embd: str) -> None:
    plan = {name: t for name, _, t, _ in mk.tensor_plan(TINY, 49152, kind, "unused")}
    assert mk.DEFAULT_EMBD_TYPE[kind] == embd
    assert "output.weight" not in plan  # tied: token_embd is also the LM head
    assert {t for n, t in plan.items() if n.endswith("norm.weight")} == {"f32"}
    assert plan["rope_freqs.weight"] == "f32"
    assert {t for n, t in plan.items() if n.startswith("blk.") and "norm" not in n} == {kind}


def test_written_model_loads_in_tokenmill(tiny_llama_gguf: Path) -> None:
    reader = gguf.GGUFReader(str(tiny_llama_gguf))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 9 * TINY.num_hidden_layers
    assert tensors["token_embd.weight"].tensor_type.name == "Q6_K"
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q4_0"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    # NOTE: the copy is checked by key, not against a second parse of the source (10 s a parse).
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) == 48900
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2

    cfg = load_gguf(str(tiny_llama_gguf)).config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (256, 2, 512)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 64)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 500000.0
    scaling = cfg["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 32.0
    assert scaling["original_max_position_embeddings"] == 8192

    def weight(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type)

    q = weight("blk.0.attn_q.weight")
    assert q.shape == (256, 256) and abs(float(q.std()) - 0.02) < 0.002
    assert np.array_equal(weight("output_norm.weight"), np.ones(256, dtype=np.float32))
    embd = weight("token_embd.weight")
    assert embd.shape == (49152, 256) and np.isfinite(embd).all()
