"""GGUF adapter: tiny GGUFs written as llama.cpp's converter writes them must load back exactly."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.config import ModelConfig
from model.gguf_config import _llama3_rope_scaling
from model.gguf_reader import read_gguf
from model.gguf_weights import load_gguf, open_gguf
from model.layers.rotary import inv_frequencies

pytestmark = pytest.mark.timeout(60)

Q = gguf.GGMLQuantizationType
# HF name → GGUF name, written out independently of model/gguf_weights.py's map.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, *module, kind = hf.split(".")
    return f"blk.{layer}.{HF_TO_GGUF['.'.join(module)]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama_cpp_rope_freqs(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama3 rope_freqs), verbatim."""
    base, factor = theta, scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wl, high_wl = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path: Path, arch: str, cfg: dict, tensors: dict[str, tuple]) -> Path:
    """A GGUF with llama.cpp's metadata keys; `tensors`: GGUF name → (array, raw quant type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for name, (arr, raw_dtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_config(folder: Path) -> dict:
    d = json.loads((folder / "config.json").read_text())
    mc = ModelConfig.from_hf_dict(d)
    return dict(d, rope_theta=mc.rope_theta, rope_scaling=mc.rope_scaling_dict)


def gguf_from_checkpoint(folder: Path, out: Path, arch: str) -> tuple[Path, dict, dict]:
    """Convert a tiny safetensors checkpoint as llama.cpp does (F32, Q/K permuted for llama)."""
    cfg = hf_config(folder)
    sd = load_file(folder / "model.safetensors")
    tensors = {}
    for name, t in sd.items():
        a = t.numpy()
        if arch == "llama" and ".q_proj." in name:
            a = llama_cpp_permute(a, cfg["num_attention_heads"], cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            a = llama_cpp_permute(a, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        tensors[gguf_name(name)] = (np.ascontiguousarray(a), None)
    if cfg["rope_scaling"]:
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        freqs = llama_cpp_rope_freqs(cfg["rope_scaling"], head_dim, cfg["rope_theta"])
        tensors["rope_freqs.weight"] = (freqs, None)
    return write_gguf(out, arch, cfg, tensors), cfg, sd


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f32_checkpoint_round_trip(tiny_checkpoint, tmp_path, arch):
    path, cfg, sd = gguf_from_checkpoint(tiny_checkpoint(arch), tmp_path / "m.gguf", arch)
    ckpt = load_gguf(str(path))
    got = dict(ckpt.tensors())
    assert sorted(got) == sorted(sd)
    for name, ref in sd.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], ref, rtol=0, atol=0, msg=name)
    c = ckpt.config
    assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert c[key] == cfg[key], key
    assert c["rope_theta"] == cfg["rope_theta"]
    assert c["rms_norm_eps"] == cfg["rms_norm_eps"]
    assert c["tie_word_embeddings"] is False and c["rope_scaling"] is None
    mc = ModelConfig.from_hf_dict(c)
    assert (mc.head_dim, mc.attention_bias) == (16, arch == "qwen2")
    # one tensor on its own, as a tensor-parallel rank reads it
    name = "model.layers.1.self_attn.k_proj.weight"
    torch.testing.assert_close(ckpt.get(name), sd[name], rtol=0, atol=0)


def test_tied_checkpoint_has_no_lm_head(tiny_checkpoint, tmp_path):
    path, _, sd = gguf_from_checkpoint(
        tiny_checkpoint("llama", tie=True), tmp_path / "t.gguf", "llama"
    )
    ckpt = load_gguf(str(path))
    assert ckpt.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensor_names()
    assert sorted(ckpt.tensor_names()) == sorted(n for n in sd if n != "lm_head.weight")


def test_llama3_rope_freqs_become_rope_scaling(tiny_checkpoint, tmp_path):
    path, cfg, _ = gguf_from_checkpoint(tiny_checkpoint("llama3"), tmp_path / "l3.gguf", "llama")
    scaling = load_gguf(str(path)).config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    # head_dim 16 has one blended frequency: other parameters may differ, the frequencies may not
    want = inv_frequencies(16, cfg["rope_theta"], cfg["rope_scaling"])
    torch.testing.assert_close(
        inv_frequencies(16, cfg["rope_theta"], scaling), want, rtol=1e-5, atol=0
    )


def test_llama31_rope_freqs_recover_exact_parameters():
    real = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    got = _llama3_rope_scaling(llama_cpp_rope_freqs(real, 128, 500000.0), 128, 500000.0)
    assert got["original_max_position_embeddings"] == 8192
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-4)
    assert got["factor"] == 8.0 and got["low_freq_factor"] == 1.0


def test_rope_freqs_that_are_not_llama3_raise(tiny_checkpoint, tmp_path):
    cfg = hf_config(tiny_checkpoint("llama"))
    bogus = np.array([1, 3, 1, 5, 2, 7, 1, 9], dtype=np.float32)  # not monotone in frequency
    path = write_gguf(
        tmp_path / "bad_rope.gguf", "llama", cfg, {"rope_freqs.weight": (bogus, None)}
    )
    with pytest.raises(ValueError, match="llama3"):
        load_gguf(str(path))


# (type, max error as a fraction of the 32-value block's largest magnitude)
SIMPLE_QUANTS = [
    ("F16", 1e-3),
    ("BF16", 4e-3),
    ("Q8_0", 1 / 127),
    ("Q4_0", 1 / 7),
    ("Q4_1", 2 / 15),
]


@pytest.mark.parametrize(("qtype", "tol"), SIMPLE_QUANTS)
def test_quantized_tensor_round_trip(tiny_checkpoint, tmp_path, qtype, tol):
    cfg = hf_config(tiny_checkpoint("qwen2"))
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[qtype])
    path = write_gguf(
        tmp_path / f"{qtype}.gguf",
        "qwen2",
        cfg,
        {"blk.0.ffn_up.weight": (raw, None if qtype == "F16" else Q[qtype])},
    )
    got = open_gguf(str(path)).get("model.layers.0.mlp.up_proj.weight")  # one tensor alone
    assert got.shape == (64, 256) and got.dtype == torch.float32
    err = (got.numpy() - x).reshape(-1, 32)
    scale = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True)
    assert (np.abs(err) <= tol * scale).all(), f"{qtype}: max err {np.abs(err).max()}"


def random_k_blocks(qtype: str, rows: int, cols: int) -> np.ndarray:
    """Random K-quant bytes with finite fp16 scales (gguf-py cannot quantize K types)."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    raw = np.random.default_rng(1).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype in ("Q6_K", "Q3_K"):
        at = 208 if qtype == "Q6_K" else 108
        raw[..., at : at + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    elif qtype == "Q2_K":
        raw[..., 80:84] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)
    else:
        raw[..., 0:4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensor_round_trip(tiny_checkpoint, tmp_path, qtype):
    cfg = hf_config(tiny_checkpoint("qwen2"))
    raw = random_k_blocks(qtype, 8, 512)
    path = write_gguf(
        tmp_path / f"{qtype}.gguf", "qwen2", cfg, {"blk.0.ffn_down.weight": (raw, Q[qtype])}
    )
    got = open_gguf(str(path)).get("model.layers.0.mlp.down_proj.weight")
    want = gguf.quants.dequantize(raw, Q[qtype])
    assert got.shape == (8, 512) and np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(got.numpy(), want)
    # packed (the float32 path) and in the file's blocks (int8 path, the file's bytes resident)
    ckpt = open_gguf(str(path))
    packed = ckpt.get("model.layers.0.mlp.down_proj.weight", packed=True)
    np.testing.assert_array_equal(packed.dequantize().numpy(), want)
    blocks = ckpt.get("model.layers.0.mlp.down_proj.weight", packed=True, blocks=True)
    assert blocks.nbytes == raw.nbytes and blocks.parts[0][0] == qtype
    np.testing.assert_array_equal(blocks.dequantize().numpy(), want)


def test_real_smollm2_config(smollm2_gguf):
    ckpt = load_gguf(smollm2_gguf)
    mc = ModelConfig.from_hf_dict(ckpt.config)
    assert (mc.architecture, mc.num_hidden_layers, mc.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert (mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim) == (9, 3, 64)
    assert (mc.vocab_size, mc.rope_theta, mc.rms_norm_eps) == (49152, 100000.0, 1e-5)
    assert mc.tie_word_embeddings and mc.rope_scaling is None
    assert len(ckpt.tensor_names()) == 30 * 9 + 2
    assert ckpt.get("model.embed_tokens.weight").shape == (49152, 576)


def test_garbage_file_raises_value_error(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="garbage.gguf"):
        load_gguf(str(bad))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf"):
        load_gguf(str(empty))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file_raises_value_error(tiny_checkpoint, tmp_path, keep):
    path, _, _ = gguf_from_checkpoint(tiny_checkpoint("qwen2"), tmp_path / "full.gguf", "qwen2")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.gguf"):
        load_gguf(str(cut))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_unknown_architecture_raises(tiny_checkpoint, tmp_path):
    cfg = hf_config(tiny_checkpoint("llama"))
    path = write_gguf(
        tmp_path / "gpt2.gguf",
        "gpt2",
        cfg,
        {"token_embd.weight": (np.zeros((4, 64), np.float32), None)},
    )
    with pytest.raises(ValueError, match="gpt2"):
        load_gguf(str(path))


def test_unknown_tensor_raises(tiny_checkpoint, tmp_path):
    cfg = hf_config(tiny_checkpoint("llama"))
    path = write_gguf(
        tmp_path / "odd.gguf",
        "llama",
        cfg,
        {"blk.0.attn_qkv.weight": (np.zeros((4, 64), np.float32), None)},
    )
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        load_gguf(str(path))


def _same_as_gguf_py(path: str) -> None:
    """model/gguf_reader.py reads exactly what gguf-py's GGUFReader reads."""
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for k in keys:
        want = ref.fields[k].contents()
        got = ours.fields[k]
        assert got == want or np.float32(got) == np.float32(want), k
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_bytes, a.data_offset) == (
            b.name, b.tensor_type, b.n_bytes, b.data_offset)  # fmt: skip
        assert list(a.shape) == list(b.shape)
        assert (a.data.dtype, a.data.shape) == (b.data.dtype, b.data.shape), a.name
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.timeout(120)
def test_header_reader_matches_gguf_py(smollm2_gguf, tiny_checkpoint, tmp_path):
    _same_as_gguf_py(smollm2_gguf)  # 49k-token vocabulary, merges, Q4_1/Q8_0/F32 tensors
    path, _, _ = gguf_from_checkpoint(tiny_checkpoint("llama"), tmp_path / "t.gguf", "llama")
    _same_as_gguf_py(str(path))
    raws = {"blk.0.ffn_up.weight": (random_k_blocks("Q6_K", 8, 512), Q["Q6_K"]),
            "blk.0.ffn_down.weight": (np.ones((8, 64), np.float16), None)}  # fmt: skip
    cfg = hf_config(tiny_checkpoint("qwen2"))
    _same_as_gguf_py(str(write_gguf(tmp_path / "k.gguf", "qwen2", cfg, raws)))


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<4sIQQ", b"GGUF", 9, 0, 0),  # unknown version
        struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 1 << 62),  # key too long
        struct.pack("<4sIQQQ3sI", b"GGUF", 3, 0, 1, 3, b"key", 77),  # unknown value type
        struct.pack("<4sIQQQ3sIIQ", b"GGUF", 3, 0, 1, 3, b"key", 9, 4, 1 << 60),  # huge array
        struct.pack("<4sIQQQ3sIIQ", b"GGUF", 3, 0, 1, 3, b"key", 9, 8, 1 << 60),  # huge str array
        struct.pack("<4sIQQ", b"GGUF", 3, 1 << 40, 0),  # tensors that are not there
    ],
)
def test_hostile_headers_raise_value_error(tmp_path, header):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(header + b"\0" * 64)
    with pytest.raises(ValueError, match="hostile.gguf"):
        load_gguf(str(path))
