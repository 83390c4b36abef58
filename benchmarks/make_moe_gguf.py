"""Write a random-weight GGUF shaped like Qwen3-30B-A3B's smaller sibling, the MoE workload of
issue 23: hidden 2048, 24 layers, 64 experts (top-8, expert FFN 768), 32 query / 4 KV heads of
128, q/k norms; about 7.6B parameters, 1.4B active a token.

    .venv/bin/python benchmarks/make_moe_gguf.py --out /tmp/moe-q8_0.gguf          # ~8 GB
    llama-quantize --allow-requantize /tmp/moe-q8_0.gguf /tmp/moe-q4_k_m.gguf Q4_K_M  # ~4.5 GB

(`--type f16` writes the unquantized source llama-quantize prefers, ~15 GB; `--type q4_0` a file
tokenmill and llama-server read as is; `--layers 4` a reduced model for quick timings.) The
expert tensors are written as llama.cpp stores them, stacked [experts, rows, cols]
(`ffn_{gate,up,down}_exps`), generated and quantized one expert at a time, so the peak memory is
one expert's float rows plus one stacked quantized tensor. The router `ffn_gate_inp` stays F32,
as llama-quantize leaves it. The vocabulary and `tokenizer.*` metadata are the default SmolLM2
GGUF's (make_llama_gguf.copy_tokenizer).
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_llama_gguf as mk  # noqa: E402

FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "f16": gguf.LlamaFileType.MOSTLY_F16}  # fmt: skip


@dataclass(frozen=True)
class MoeShape:
    """Model hyper-parameters; the defaults are issue 23's benchmark model."""

    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    context_length: int = 32768


def tensor_plan(s: MoeShape, vocab: int, kind: str) -> list[tuple]:
    """(name, numpy shape, type, std or None for ones) in llama.cpp's qwen3moe order."""
    h, d, e, f = s.hidden_size, s.head_dim, s.num_experts, s.moe_intermediate_size
    q, kv = s.num_attention_heads * d, s.num_key_value_heads * d
    plan: list[tuple] = [("token_embd.weight", (vocab, h), kind, 0.02)]
    for i in range(s.num_hidden_layers):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (h,), "f32", None),
            (p + "attn_q.weight", (q, h), kind, 0.02),
            (p + "attn_k.weight", (kv, h), kind, 0.02),
            (p + "attn_v.weight", (kv, h), kind, 0.02),
            (p + "attn_output.weight", (h, q), kind, 0.02),
            (p + "attn_q_norm.weight", (d,), "f32", None),
            (p + "attn_k_norm.weight", (d,), "f32", None),
            (p + "ffn_norm.weight", (h,), "f32", None),
            (p + "ffn_gate_inp.weight", (e, h), "f32", 0.02),
            (p + "ffn_gate_exps.weight", (e, f, h), kind, 0.02),
            (p + "ffn_up_exps.weight", (e, f, h), kind, 0.02),
            (p + "ffn_down_exps.weight", (e, h, f), kind, 0.02),
        ]
    plan += [("output_norm.weight", (h,), "f32", None), ("output.weight", (vocab, h), kind, 0.02)]
    return plan


def generate(name: str, shape: tuple[int, ...], kind: str, std: float | None, seed: int):
    """One tensor's bytes, a 3-D one expert by expert (its own generator per name)."""
    if std is None:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    if len(shape) == 2:
        return mk.generate(name, shape, kind, std, seed)
    out = None
    for i in range(shape[0]):
        w = mk.quantize(rng.standard_normal(shape[1:], dtype=np.float32) * np.float32(std), kind)
        if out is None:
            out = np.empty((shape[0], *w.shape), dtype=w.dtype)
        out[i] = w
    return out


def write_gguf(out: Path, kind: str, seed: int, source: str, s: MoeShape) -> tuple[int, int]:
    """Write the model; returns (tensor count, file bytes)."""
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    w.add_name(f"random Qwen3-MoE-shaped {kind.upper()} (tokenmill benchmark)")
    w.add_file_type(FILE_TYPES[kind])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(s.num_hidden_layers)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    w.add_feed_forward_length(s.moe_intermediate_size * s.num_experts_per_tok)
    w.add_head_count(s.num_attention_heads)
    w.add_head_count_kv(s.num_key_value_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)
    w.add_expert_count(s.num_experts)
    w.add_expert_used_count(s.num_experts_per_tok)
    w.add_expert_feed_forward_length(s.moe_intermediate_size)
    vocab = mk.copy_tokenizer(w, source)
    plan = tensor_plan(s, vocab, kind)
    for name, shape, tkind, _ in plan:
        raw = None if tkind == "f32" else mk.TYPES[tkind]
        w.add_tensor_info(name, shape, np.float32, mk.nbytes(shape, tkind), raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, tkind, std in plan:
        w.write_tensor_data(generate(name, shape, tkind, std, seed))
    w.close()
    return len(plan), out.stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--type", choices=sorted(FILE_TYPES), default="q8_0", dest="kind")
    ap.add_argument("--out", type=Path, required=True, help="GGUF file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=MoeShape.num_hidden_layers,
                    help="decoder layers (fewer: a reduced model for quick timings)")  # fmt: skip
    ap.add_argument("--tokenizer-from", default=None, help="GGUF to copy tokenizer.* from")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    source = args.tokenizer_from or mk.default_source()
    shape = MoeShape(num_hidden_layers=args.layers)
    count, size = write_gguf(args.out, args.kind, args.seed, source, shape)
    print(f"wrote {args.out}: {count} tensors, {size / 2**20:.0f} MiB, {args.kind}, "
          f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
