"""GGUF header → HF config.json dict: architecture tables, sizes, RoPE scaling, MoE metadata.

What ModelConfig reads for a safetensors folder, recovered from a GGUF's metadata and its few
config tensors (rope_freqs, Phi-3's rope factors); gguf_weights.py reads the weights.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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

MAX_SIZE = 1 << 24  # any one dimension (hidden, heads, vocabulary, FFN width) a GGUF may declare
MAX_LAYERS = 4096


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


def build_config(reader: Any, path: str, tensors: dict[str, Any]) -> dict[str, Any]:
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
