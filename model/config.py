"""ModelConfig: the architecture facts the model needs, read once from a config.json-style dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: float32 on CPU, bfloat16 on CUDA
QUANTIZATIONS = ("none", "int8", "int4")  # None (no flag): a GGUF's own, float for HF folders
# auto: int8 for a GGUF's packed weights on a CPU with the C kernels, else float32 (the oracle)
ACTIVATION_DTYPES = ("auto", "float32", "int8")


def check_engine_args(
    *,
    block_size: int = 16,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    quantization: str | None = None,
    activation_dtype: str = "auto",
) -> None:
    """The one check of the knobs EngineConfig and ModelRunner share; ValueError naming them."""
    for name, value in (("block_size", block_size), ("tensor_parallel_size", tensor_parallel_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value, allowed in (
        ("dtype", dtype, DTYPES),
        ("kv_cache_dtype", kv_cache_dtype, DTYPES),
        ("quantization", quantization, (None, *QUANTIZATIONS)),
        ("activation_dtype", activation_dtype, ACTIVATION_DTYPES),
    ):
        if value not in allowed:
            names = ", ".join(a for a in allowed if a is not None)
            raise ValueError(f"{name} must be one of {names}, got {value!r}")


# architecture name -> (qkv bias by default)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Frozen subset of a Hugging Face config.json that the Llama family needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # sorted items of the rope_scaling dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v (Qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads classic `rope_theta`/`rope_scaling` keys and transformers-5 `rope_parameters`."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"config of {arch} lacks required key {key!r}")
        window = d.get("sliding_window")
        uses_window = window is not None and d.get("use_sliding_window", True)
        if arch == "MistralForCausalLM" and uses_window:
            max_pos = d.get("max_position_embeddings", 0)
            if window < max_pos:
                raise ValueError(
                    f"sliding_window {window} < max_position_embeddings {max_pos} is not supported"
                )
        _check_sizes(d, arch)
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        rope_theta, scaling = _rope(d)
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", 4 * hidden),
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )


# the sizes a model is allocated from: positive ints (when present)
SIZE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings",
)  # fmt: skip


def _check_sizes(d: dict[str, Any], arch: str) -> None:
    """Every size a model is built from is a positive int (0 heads would divide by zero later);
    a missing head_dim needs hidden_size to split evenly over the heads."""
    for key in SIZE_KEYS:
        value = d.get(key)
        if key not in d or (value is None and key in ("num_key_value_heads", "head_dim")):
            continue
        if type(value) is not int or value < 1:
            raise ValueError(f"config of {arch}: {key} is {value!r}, not a positive integer")
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    if not d.get("head_dim") and hidden % heads:
        raise ValueError(f"config of {arch}: hidden_size {hidden} is not divisible by "
                         f"num_attention_heads {heads} (and no head_dim)")  # fmt: skip


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None); `default` rope types mean no scaling."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        params = dict(params)
        theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return theta, None
        if kind not in ("llama3", "linear"):
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")
        scaling["rope_type"] = kind
        scaling.pop("type", None)
    return theta, scaling
