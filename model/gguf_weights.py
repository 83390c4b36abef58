"""GGUF file → (hf_name, tensor) stream plus an HF-style config dict: the GGUF adapter.

Quantized 2-D tensors stay packed (GGUFQuantTensor): a rank's loader narrows one to its rows or
columns and only those raw blocks are converted. Float tensors, and everything under quantization
"none" (the reference path), are dequantized whole, then narrowed.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.gguf_reader import GGUFFile, read_gguf
from model.layers.qdot import GGML_TYPE_IDS, BlockTensor, permute_block_rows
from model.layers.quant import PACKED_TYPES, QuantTensor, from_gguf_blocks, permute_rows

logger = logging.getLogger(__name__)

# general.architecture → (HF architectures entry, HF model_type). NOTE: llama.cpp's converter
# writes Mistral as "llama" and keeps no sliding_window: such a file serves full attention.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "smollm3": ("SmolLM3ForCausalLM", "smollm3"),
    "granite": ("GraniteForCausalLM", "granite"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "olmoe": ("OlmoeForCausalLM", "olmoe"),
}
MIXTRAL = ("MixtralForCausalLM", "mixtral")  # written as "llama" with an expert_count
# llama.cpp's norm_w per architecture where the file has no expert_weights_norm
NORM_TOPK = {"qwen3moe": True, "llama": True, "qwen2moe": False, "olmoe": False}
PERMUTED_QK = ("llama", "smollm3", "granite")  # the converter's LlamaModel.permute: undone here
NORM_PLUS_ONE = ("gemma2", "gemma3")  # the converter stores Gemma's (1 + w): w is given back

MAX_SIZE = 1 << 24  # any one dimension (hidden, heads, vocabulary, FFN width) a GGUF may declare
MAX_LAYERS = 4096
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the router
    "ffn_gate_exps": "mlp.experts.gate_proj",  # [E, inter, hidden], every expert stacked
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# per architecture: the names whose meaning differs from _PER_LAYER's
_PER_LAYER_ARCH = {
    "gemma2": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused
}
_PER_LAYER_ARCH["gemma3"] = _PER_LAYER_ARCH["gemma2"]
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# older Mixtral files: one tensor per expert (blk.N.ffn_gate.E.weight), not stacked
_EXPERT_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Tensors that configure the model instead of holding weights (consumed into the config).
_CONFIG_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' → 'model.layers.3.self_attn.q_proj.weight'; None when unknown."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _EXPERT_NAME.match(name)
    if m is not None:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    m = _LAYER_NAME.match(name)
    if m is None:
        return None
    hf = _PER_LAYER_ARCH.get(arch, {}).get(m.group(2)) or _PER_LAYER.get(m.group(2))
    return None if hf is None else f"model.layers.{m.group(1)}.{hf}.{m.group(3)}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` (rotary pairs interleaved → HF's halves)."""
    # w: [n_head * head_dim, ...] stored as [n_head, head_dim // 2, 2, ...]
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def _read(path: str) -> GGUFFile:
    """Parse the header; any parse failure becomes a ValueError that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return read_gguf(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        size = os.path.getsize(path)
        raise ValueError(f"corrupt or truncated GGUF file {path} ({size} bytes): {e}") from e


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """Recover HF llama3 rope_scaling from llama.cpp's `rope_freqs` (per-frequency divisors).

    llama.cpp stores 1 (high freq), `factor` (low freq) or a smooth blend per frequency; HF's
    llama3 rule is `s = clamp(a * freq - b, 0, 1)` with `a = orig_ctx / (2π (hi - lo))` and
    `b = lo / (hi - lo)`, so fixing low_freq_factor = 1 loses nothing. The fit
    is checked against every stored factor.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [hd/2]
    rf = factors.astype(np.float64)
    factor = float(rf.max())
    if factor <= 1.0 + 1e-6:
        raise ValueError(f"rope_freqs tensor holds no scaling (max factor {factor})")
    s = (1.0 / rf - 1.0 / factor) / (1.0 - 1.0 / factor)  # 1 high freq … 0 low freq
    high, low = s > 1 - 1e-6, s < 1e-6
    mid = ~(high | low)
    f = inv_freq
    if mid.sum() >= 2:
        a, b = np.polyfit(f[mid], s[mid], 1)
        b = -b
    else:
        # Not enough blended points: any line through them that keeps the ends clamped works.
        f_low = f[low].max() if low.any() else f.min() / 2
        f_high = f[high].min() if high.any() else f.max() * 2
        if mid.any():
            (fm,), (sm,) = f[mid], s[mid]
            a = sm / (fm - f_low)
            if a * (f_high - fm) + sm < 1:
                a = (1 - sm) / (f_high - fm)
            b = a * fm - sm
        else:
            a = 1.0 / (f_high - f_low)
            b = a * f_low
    if a <= 0 or b <= 0:
        raise ValueError(f"rope_freqs tensor is not llama3-style scaling (fit a={a}, b={b})")
    high_freq_factor = 1.0 + 1.0 / b
    orig = 2 * math.pi * a / b
    for ctx in (round(orig), orig):  # prefer the integer context length the source config had
        x = np.clip(ctx / (2 * math.pi) * f - 1.0, 0, high_freq_factor - 1) / (high_freq_factor - 1)
        if np.allclose(1.0 / ((1 - x) / factor + x), rf, rtol=1e-4):
            break
    else:
        raise ValueError("rope_freqs tensor does not follow llama3 scaling: unsupported rope")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(high_freq_factor),
        "original_max_position_embeddings": ctx,
    }


def _build_config(reader: Any, path: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """GGUF metadata → HF config.json dict (what ModelConfig reads for a safetensors folder)."""
    arch = reader.fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path}: supported {sorted(ARCHITECTURES)}"
        )

    fields = reader.fields

    def size(key: str, default: Any = None, hi: int = MAX_SIZE) -> int:
        """A positive integer size from the metadata (ValueError naming it otherwise)."""
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF file {path} lacks metadata key {arch}.{key}")
        if type(value) is not int or not 0 < value <= hi:
            raise ValueError(f"GGUF file {path}: {arch}.{key} is {value!r}, not in [1, {hi}]")
        return value

    def number(key: str, default: float) -> float:
        value = fields.get(key, default)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"GGUF file {path}: {key} is {value!r}, not a finite number")
        return float(value)

    hidden, n_head = size("embedding_length"), size("attention.head_count")
    n_kv = size("attention.head_count_kv", n_head)
    if n_head % n_kv:
        raise ValueError(f"GGUF file {path}: head_count {n_head} is not a multiple of "
                         f"head_count_kv {n_kv}")  # fmt: skip
    if hidden % n_head and f"{arch}.attention.key_length" not in fields:
        raise ValueError(f"GGUF file {path}: embedding_length {hidden} is not divisible by "
                         f"head_count {n_head}, and there is no attention.key_length")  # fmt: skip
    head_dim = size("attention.key_length", hidden // n_head)
    embd = tensors.get("token_embd.weight")
    vocab = fields.get(f"{arch}.vocab_size", int(embd.shape[1]) if embd is not None else None)
    if vocab is None and "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"GGUF file {path} has neither vocab_size nor token_embd.weight")
    vocab = vocab if vocab is not None else len(fields["tokenizer.ggml.tokens"])
    if type(vocab) is not int or not 0 < vocab <= MAX_SIZE:
        raise ValueError(f"GGUF file {path}: vocabulary size {vocab!r} is not in [1, {MAX_SIZE}]")
    theta = number(f"{arch}.rope.freq_base", 10000.0)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": ARCHITECTURES[arch][1],
        "hidden_size": hidden,
        "intermediate_size": size("feed_forward_length"),
        "num_hidden_layers": size("block_count", hi=MAX_LAYERS),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, path, tensors, head_dim, theta),
        # stored as float32: print 7 digits to get back the source's 1e-05, not 9.99999974e-06
        "rms_norm_eps": float(f"{number(f'{arch}.attention.layer_norm_rms_epsilon', 1e-6):.7g}"),
        "vocab_size": vocab,
        "max_position_embeddings": size("context_length", 2048, hi=1 << 31),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = fields.get(f"tokenizer.ggml.{key}")
        if value is not None:
            if type(value) is not int or not 0 <= value < vocab:
                raise ValueError(f"GGUF file {path}: tokenizer.ggml.{key} {value!r} is not a "
                                 f"token id in [0, {vocab})")  # fmt: skip
            config[key] = value
    if arch == "qwen2":
        config["attention_bias"] = True
    config.update(_family_config(reader, arch, config, tensors))
    config.update(_moe_config(fields, arch, config, tensors))
    return config


def _moe_config(
    fields: dict[str, Any], arch: str, config: dict[str, Any], tensors: dict[str, Any]
) -> dict[str, Any]:
    """Routed experts: counts and widths from the metadata; a layer without a router
    (ffn_gate_inp) is dense, as llama.cpp's loader finds it."""
    experts = fields.get(f"{arch}.expert_count")
    if not experts:
        return {}
    out: dict[str, Any] = {}
    if arch == "llama":
        out["architectures"], out["model_type"] = [MIXTRAL[0]], MIXTRAL[1]
    n = config["num_hidden_layers"]
    out["num_experts"] = experts
    out["num_experts_per_tok"] = fields.get(f"{arch}.expert_used_count")
    out["moe_intermediate_size"] = fields.get(
        f"{arch}.expert_feed_forward_length", config["intermediate_size"]
    )
    shared = fields.get(f"{arch}.expert_shared_feed_forward_length")
    if shared:
        out["shared_expert_intermediate_size"] = shared
    out["norm_topk_prob"] = bool(fields.get(f"{arch}.expert_weights_norm", NORM_TOPK.get(arch)))
    dense = [i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]
    if dense:
        out["mlp_only_layers"] = dense
    return out


def _dequantized(tensors: dict[str, Any], name: str) -> list[float]:
    import gguf

    t = tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1).tolist()


def _family_config(
    reader: Any, arch: str, config: dict[str, Any], tensors: dict[str, Any]
) -> dict[str, Any]:
    """The HF config keys a family adds, from its metadata, or as llama.cpp assumes them where
    the converter stores nothing (Gemma's layer pattern and query scale, SmolLM3's NoPE step)."""

    def get(key: str, default: Any = None) -> Any:
        return reader.fields.get(f"{arch}.{key}", default)

    n, out = config["num_hidden_layers"], {}
    head_dim = config["head_dim"]
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        out["partial_rotary_factor"] = int(rot) / head_dim
    window = get("attention.sliding_window")
    if arch in ("gemma2", "gemma3"):
        if window:
            pattern = get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
            if isinstance(pattern, list):  # one flag per layer
                sliding = [bool(x) for x in pattern]
            else:  # llama.cpp's set_swa_pattern: the last layer of each period is global
                sliding = [
                    int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n)
                ]
            out["sliding_window"] = int(window)
            out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        # NOTE: not in the file: llama.cpp scales by 1/sqrt(head_dim), by hidden/heads for 27B
        big = n == (46 if arch == "gemma2" else 62)
        out["query_pre_attn_scalar"] = (
            config["hidden_size"] // config["num_attention_heads"] if big else head_dim
        )
        out["attn_logit_softcapping"] = get("attn_logit_softcapping")
        out["final_logit_softcapping"] = get("final_logit_softcapping")
        if arch == "gemma3":
            out["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    elif arch == "smollm3":  # NOTE: not in the file: llama.cpp's n_no_rope_layer_step = 4
        out["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(n)]
    elif arch == "granite":
        for key, hf in (
            ("attention.scale", "attention_multiplier"),
            ("embedding_scale", "embedding_multiplier"),
            ("residual_scale", "residual_multiplier"),
            ("logit_scale", "logits_scaling"),
        ):
            if get(key) is not None:
                out[hf] = float(get(key))
    elif arch == "phi3":
        if window:
            out["sliding_window"] = int(window)
        if "rope_factors_long.weight" in tensors:
            orig = int(
                get("rope.scaling.original_context_length", config["max_position_embeddings"])
            )
            out["original_max_position_embeddings"] = orig
            out["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": _dequantized(tensors, "rope_factors_long.weight"),
                "short_factor": _dequantized(tensors, "rope_factors_short.weight"),
                "original_max_position_embeddings": orig,
                "attention_factor": float(get("rope.scaling.attn_factor", 1.0)),
            }
    return {k: v for k, v in out.items() if v is not None}


def _rope_scaling(
    reader: Any, arch: str, path: str, tensors: dict[str, Any], head_dim: int, theta: float
) -> dict[str, Any] | None:
    """rope_scaling from `rope_freqs` (llama3) or `{arch}.rope.scaling.*` (linear, yarn; Phi-3's
    longrope in _family_config); unknown kinds raise."""
    if "rope_freqs.weight" in tensors:
        import gguf

        t = tensors["rope_freqs.weight"]
        factors = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        return _llama3_rope_scaling(factors, head_dim, theta)
    kind = reader.fields.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = reader.fields.get(f"{arch}.rope.scaling.factor", 1.0)
    if type(factor) not in (int, float) or not 0 < factor < math.inf:
        raise ValueError(f"GGUF file {path}: rope scaling factor {factor!r} is not positive")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        for key, hf in (
            ("original_context_length", "original_max_position_embeddings"),
            ("yarn_attn_factor", "attention_factor"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
        ):
            value = reader.fields.get(f"{arch}.rope.scaling.{key}")
            if value is not None:
                scaling[hf] = int(value) if key == "original_context_length" else float(value)
        return scaling
    raise ValueError(f"unsupported rope scaling type {kind!r} in GGUF file {path}")


class GGUFQuantTensor(QuantTensor):
    """A packed GGUF weight read on demand: narrow_rows / narrow_cols convert only a rank's raw
    blocks, anything else the whole tensor once. `heads`: llama Q/K rows are permuted per head,
    so a slice of whole heads is un-permuted on its own."""

    __slots__ = ("kind", "raw", "rows", "cols", "heads", "_whole")

    def __init__(self, kind: str, raw: np.ndarray, rows: int, cols: int, heads: int | None):
        self.kind, self.raw, self.rows, self.cols, self.heads = kind, raw, rows, cols, heads
        self._whole: QuantTensor | None = None

    def _convert(self, raw: np.ndarray, rows: int, cols: int) -> QuantTensor:
        out = from_gguf_blocks(self.kind, raw, rows, cols)
        if self.heads is not None:
            heads = self.heads * rows // self.rows
            out = permute_rows(out, lambda r, h=heads: unpermute_qk(r, h))
        return QuantTensor(out.fmt, out.qweight, out.scales, out.mins)

    def whole(self) -> QuantTensor:
        if self._whole is None:
            self._whole = self._convert(self.raw, self.rows, self.cols)
        return self._whole

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __getattr__(self, name: str) -> Any:
        """fmt, qweight, scales, mins (this subclass leaves those slots unset): the whole one's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.whole(), name)

    def narrow_rows(self, start: int, length: int) -> QuantTensor:
        """Rows [start, start + length), converted from those rows' raw blocks alone."""
        head_rows = self.rows // self.heads if self.heads else 1
        if start % head_rows or length % head_rows:
            return self.whole().narrow_rows(start, length)
        return self._convert(self.raw[start : start + length], length, self.cols)

    def narrow_cols(self, start: int, length: int) -> QuantTensor | None:
        """Columns [start, start + length): whole GGUF blocks are sliced raw, else converted."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.kind]]
        if start % block or length % block:
            return self.whole().narrow_cols(start, length)
        raw = self.raw[:, start // block * size : (start + length) // block * size]
        return self._convert(raw, self.rows, length)

    def dequantize(self) -> torch.Tensor:
        return self.whole().dequantize()


class GGUFExperts:
    """A stacked [E, rows, cols] quantized expert tensor (ffn_*_exps), read one expert at a time
    from its own bytes: never unstacked or dequantized whole (model/layers/experts.py)."""

    __slots__ = ("kind", "raw", "rows", "cols", "blocks")

    def __init__(self, kind: str, raw: np.ndarray, rows: int, cols: int, blocks: bool) -> None:
        self.kind, self.raw, self.rows, self.cols, self.blocks = kind, raw, rows, cols, blocks

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.raw.shape[0], self.rows, self.cols

    def expert(self, e: int) -> QuantTensor:
        """Expert e: the file's blocks (int8 path) or a lazily converted packed tensor."""
        if self.blocks and self.kind in GGML_TYPE_IDS:
            data = torch.from_numpy(np.array(self.raw[e], dtype=np.uint8, copy=True))
            return BlockTensor([(self.kind, data)], self.cols)
        return GGUFQuantTensor(self.kind, self.raw[e], self.rows, self.cols, None)


@dataclass(slots=True)
class GGUFCheckpoint:
    """A memory-mapped GGUF: HF-style config plus tensors read and dequantized on demand."""

    path: str
    config: dict[str, Any]
    reader: Any = field(repr=False)
    _by_hf_name: dict[str, Any] = field(repr=False)  # hf name → gguf ReaderTensor

    def tensor_names(self) -> list[str]:
        """HF names of every weight tensor, in file order."""
        return list(self._by_hf_name)

    def has_blocks(self) -> bool:
        """Whether a matrix is in quantized blocks the int8 kernels take (an F16/F32 file has
        none: its weights are float, and `--activation-dtype auto` keeps it exact)."""
        return any(
            t.tensor_type.name in GGML_TYPE_IDS and len(t.shape) == 2
            for t in self._by_hf_name.values()
        )

    def get(
        self, name: str, packed: bool = False, blocks: bool = False
    ) -> torch.Tensor | QuantTensor:
        """One tensor by HF name, (llama Q/K) un-permuted: dequantized to float32, or with
        packed=True a quantized tensor kept in its packed layout (model/layers/quant.py), or with
        blocks=True too, where qdot.c takes its type, in the file's own blocks (int8 path)."""
        import gguf

        t = self._by_hf_name.get(name)
        if t is None:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        kind = t.tensor_type.name
        heads = None
        arch = self.reader.fields.get("general.architecture")
        if packed and kind in PACKED_TYPES and len(t.shape) == 3:
            cols, rows, experts = (int(n) for n in t.shape)
            return GGUFExperts(kind, t.data.reshape(experts, rows, -1), rows, cols, blocks)
        if arch in PERMUTED_QK:
            if ".self_attn.q_proj." in name:
                heads = self.config["num_attention_heads"]
            elif ".self_attn.k_proj." in name:
                heads = self.config["num_key_value_heads"]
        if packed and blocks and kind in GGML_TYPE_IDS and len(t.shape) == 2:
            cols, rows = (int(n) for n in t.shape)  # GGUF lists the fastest dimension first
            data = torch.from_numpy(np.array(t.data.reshape(rows, -1), dtype=np.uint8, copy=True))
            out = BlockTensor([(kind, data)], cols)
            if heads is None:
                return out
            return permute_block_rows(out, lambda r: unpermute_qk(r, heads))
        if packed and kind in PACKED_TYPES and len(t.shape) == 2:
            cols, rows = (int(n) for n in t.shape)
            return GGUFQuantTensor(kind, t.data.reshape(rows, -1), rows, cols, heads)
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, cols] torch order
        out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            out -= 1.0
        return unpermute_qk(out, heads) if heads is not None else out

    def tensors(
        self, packed: bool = False, blocks: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
        """Yield (hf_name, tensor) one at a time (packed: quantized types stay packed; blocks: in
        the file's blocks where the int8 kernels take them); a tied model has no lm_head.weight."""
        for name in self._by_hf_name:
            yield name, self.get(name, packed, blocks)
            _release_pages(self.reader, self._by_hf_name[name])  # the consumer has converted it


def _release_pages(reader: Any, t: Any) -> None:
    """Drop a converted tensor's file pages from this process's RSS (they stay in the page
    cache): the packed or float copy is what stays resident, not the mapping beside it."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(int(t.data_offset) + int(t.n_bytes), len(mm))
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _check_shapes(config: dict[str, Any], by_hf: dict[str, Any], path: str) -> None:
    """Every size the header declares is a tensor the file holds, before a model is allocated
    from them: token_embd is [vocab, hidden], block_count layers are there, each of the shapes
    its heads and FFN width say."""
    c = config
    hidden, vocab, inter = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    want = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,)}  # fmt: skip
    per_layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter),
    }  # fmt: skip
    if "model.embed_tokens.weight" not in by_hf:
        raise ValueError(f"GGUF file {path} has no token_embd.weight")
    layers = set()
    for name, t in by_hf.items():
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dim first
        if name.startswith("model.layers."):
            index, _, role = name.removeprefix("model.layers.").partition(".")
            layers.add(int(index))
            expected = per_layer.get(role)
        else:
            expected = want.get(name)
        if expected is not None and shape != expected:
            raise ValueError(f"GGUF file {path}: tensor {name} is {list(shape)}, its header "
                             f"says {list(expected)}")  # fmt: skip
    n = c["num_hidden_layers"]
    if layers != set(range(n)):
        raise ValueError(f"GGUF file {path}: block_count {n}, but it holds tensors of "
                         f"{len(layers)} layers")  # fmt: skip


def load_gguf(path: str) -> GGUFCheckpoint:
    """open_gguf, then check that every size its header declares matches the tensors it holds
    (a model is allocated from those sizes). Raises as open_gguf does, and ValueError naming
    the size and tensor that disagree."""
    ckpt = open_gguf(path)
    _check_shapes(ckpt.config, ckpt._by_hf_name, ckpt.path)
    return ckpt


def open_gguf(path: str) -> GGUFCheckpoint:
    """Open a GGUF file: validate its header, map tensor names, build the HF-style config.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a corrupt or
    truncated file, an unsupported architecture, quantization type, or unknown tensor.
    """
    path = os.fspath(path)
    reader = _read(path)
    raw = {t.name: t for t in reader.tensors}
    config = _build_config(reader, path, raw)
    # NOTE: the tokenizer reads the file itself: its arrays (49k strings, merges: ~20 MB) go
    for key in [
        k for k, v in reader.fields.items() if k.startswith("tokenizer.ggml.") and type(v) is list
    ]:
        del reader.fields[key]
    by_hf: dict[str, Any] = {}
    for name, t in raw.items():
        if name in _CONFIG_TENSORS:
            continue
        hf_name = gguf_to_hf_name(name, reader.fields.get("general.architecture"))
        if hf_name is None:
            raise ValueError(f"unknown tensor {name!r} in GGUF file {path}")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"tensor {name} in {path} has unsupported type {t.tensor_type.name}: "
                f"supported {', '.join(SUPPORTED_TYPES)}"
            )
        by_hf[hf_name] = t
    logger.info(
        "GGUF %s: %s, %d tensors, %d layers",
        os.path.basename(path),
        config["architectures"][0],
        len(by_hf),
        config["num_hidden_layers"],
    )
    return GGUFCheckpoint(path=path, config=config, reader=reader, _by_hf_name=by_hf)
