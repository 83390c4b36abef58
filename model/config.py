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


# architecture name -> its family's defaults where config.json leaves a key out
SUPPORTED_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "Gemma2ForCausalLM": {"hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    "Gemma3ForCausalLM": {
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "qk_norm": True,
    },
    "SmolLM3ForCausalLM": {"tie_word_embeddings": True},
    "GraniteForCausalLM": {},
    "Phi3ForCausalLM": {},
    # mixture of experts (model/models/moe.py)
    "Qwen3MoeForCausalLM": {"qk_norm": True},
    "MixtralForCausalLM": {"norm_topk_prob": True},  # always renormalizes its top-k
    "Qwen2MoeForCausalLM": {"attention_bias": True},
    "OlmoeForCausalLM": {},
}
MOE_ARCHITECTURES = (
    "Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM",
)  # fmt: skip
ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Frozen subset of a Hugging Face config.json: what every supported family needs."""

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
    hidden_act: str = "silu"  # gelu_pytorch_tanh: Gemma's gated MLP
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None = None  # None: no layer is windowed (or the window is moot)
    layer_types: tuple[str, ...] = ()  # per layer: FULL or SLIDING; () = all FULL
    rope_layers: tuple[bool, ...] = ()  # per layer: RoPE applied (SmolLM3's NoPE layers); () = all
    partial_rotary_factor: float = 1.0  # Phi-3/4: RoPE on the first part of each head
    rope_local_theta: float | None = None  # Gemma 3's sliding layers: their own base, unscaled
    query_pre_attn_scalar: float | None = None  # Gemma: scale = this ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2
    final_logit_softcapping: float | None = None  # Gemma 2
    embedding_multiplier: float = 1.0  # Granite (Gemma's sqrt(hidden) is the family's own)
    residual_multiplier: float = 1.0  # Granite
    attention_multiplier: float | None = None  # Granite: the attention scale itself
    logits_scaling: float = 1.0  # Granite: logits are divided by it
    num_experts: int = 0  # mixture of experts: routed experts per MoE layer (0: dense model)
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's FFN width
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0: none
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts (else the dense MLP)
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip]

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == SLIDING

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def all_layers_sliding(self) -> bool:
        """Every layer is windowed: KV blocks behind the window can be freed."""
        return self.sliding_window is not None and all(t == SLIDING for t in self.layer_types)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads classic `rope_theta`/`rope_scaling` keys and transformers-5 `rope_parameters`."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch == "Gemma3ForConditionalGeneration":  # served as its text model
            return cls.from_hf_dict(_gemma3_text(d))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        defaults = SUPPORTED_ARCHITECTURES[arch]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"config of {arch} lacks required key {key!r}")
        _check_sizes(d, arch)
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        n = d["num_hidden_layers"]
        max_pos = d.get("max_position_embeddings", 2048)
        rope_theta, scaling, local_theta = _rope(d)
        window, layer_types = _windows(d, arch, n, max_pos)
        partial = (d.get("rope_parameters") or {}).get("partial_rotary_factor")
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", 4 * hidden),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=d.get("head_dim") or hidden // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(
                d.get("tie_word_embeddings", defaults.get("tie_word_embeddings", False))
            ),
            attention_bias=bool(
                d.get("attention_bias", d.get("qkv_bias", defaults.get("attention_bias", False)))
            ),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            hidden_act=(
                d.get("hidden_activation")
                or d.get("hidden_act")
                or defaults.get("hidden_act", "silu")
            ),
            qk_norm=defaults.get("qk_norm", False),
            sliding_window=window,
            layer_types=layer_types,
            rope_layers=_rope_layers(d, n),
            partial_rotary_factor=float(partial or d.get("partial_rotary_factor") or 1.0),
            rope_local_theta=local_theta,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            final_logit_softcapping=d.get("final_logit_softcapping"),
            embedding_multiplier=float(d.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(d.get("residual_multiplier", 1.0)),
            attention_multiplier=d.get("attention_multiplier"),
            logits_scaling=float(d.get("logits_scaling", 1.0)),
            **_moe(d, arch, n),
        )


# the sizes a model is allocated from: positive ints (when present)
SIZE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings",
    "moe_intermediate_size",
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


def _moe(d: dict[str, Any], arch: str, n: int) -> dict[str, Any]:
    """The routed-expert fields: which layers are sparse (Qwen's decoder_sparse_step and
    mlp_only_layers), the top-k, each expert's width, the shared expert (Qwen2-MoE)."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    experts = d.get("num_experts") or d.get("num_local_experts") or 0
    k = d.get("num_experts_per_tok") or 0
    if type(experts) is not int or type(k) is not int or not 0 < k <= experts:
        raise ValueError(f"config of {arch}: num_experts_per_tok {k!r} is not in [1, "
                         f"num_experts {experts!r}]")  # fmt: skip
    step = d.get("decoder_sparse_step") or 1
    only = set(d.get("mlp_only_layers") or ())
    shared = d.get("shared_expert_intermediate_size") or 0
    norm = SUPPORTED_ARCHITECTURES[arch].get("norm_topk_prob") or d.get("norm_topk_prob", False)
    return dict(
        num_experts=experts,
        num_experts_per_tok=k,
        moe_intermediate_size=(
            d.get("moe_intermediate_size") or d.get("intermediate_size") or 4 * d["hidden_size"]
        ),
        norm_topk_prob=bool(norm),
        shared_expert_intermediate_size=shared if arch == "Qwen2MoeForCausalLM" else 0,
        moe_layers=tuple(i not in only and (i + 1) % step == 0 for i in range(n)),
        clip_qkv=d.get("clip_qkv"),
    )


def _gemma3_text(d: dict[str, Any]) -> dict[str, Any]:
    """A multimodal Gemma 3 config's text model, with transformers' defaults for what the hub's
    config.json leaves out (its text_config lists only what differs from them)."""
    from transformers import AutoConfig

    text = dict(d.get("text_config") or {})
    text.pop("model_type", None)
    full = AutoConfig.for_model("gemma3_text", **text).to_dict()
    full["architectures"] = ["Gemma3ForCausalLM"]
    if "tie_word_embeddings" in d and "tie_word_embeddings" not in text:
        full["tie_word_embeddings"] = d["tie_word_embeddings"]
    return full


def _rope_layers(d: dict[str, Any], n: int) -> tuple[bool, ...]:
    """SmolLM3's per-layer RoPE flags: `no_rope_layers` (1 = RoPE), else every
    `no_rope_layer_interval`-th layer without; () where every layer rotates."""
    flags = d.get("no_rope_layers")
    if flags is None and d.get("no_rope_layer_interval"):
        step = int(d["no_rope_layer_interval"])
        flags = [int((i + 1) % step != 0) for i in range(n)]
    if flags is not None and len(flags) != n:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {n} layers")
    return tuple(bool(x) for x in flags or ())


def _windows(d: dict[str, Any], arch: str, n: int, max_pos: int) -> tuple[int | None, tuple]:
    """(sliding_window or None, per-layer types) as transformers decides them for each family."""
    window = d.get("sliding_window")
    if window is None or arch in ("LlamaForCausalLM", "OlmoeForCausalLM"):
        return None, (FULL,) * n
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM") and not d.get("use_sliding_window"):
        return None, (FULL,) * n  # NOTE: Qwen2-MoE's config sets sliding_window 0 then
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM") and d.get("layer_types") is None:
        pattern = 2 if arch == "Gemma2ForCausalLM" else d.get("sliding_window_pattern", 6)
        types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
    elif d.get("layer_types") is not None:
        types = tuple(d["layer_types"])
    elif arch in (
        "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM", "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
    ):  # fmt: skip
        if not d.get("use_sliding_window", False):
            return None, (FULL,) * n
        first = d.get("max_window_layers", n)
        types = tuple(SLIDING if i >= first else FULL for i in range(n))
    else:  # Mistral, Phi-3: every layer
        types = (SLIDING,) * n
    if len(types) != n or any(t not in (FULL, SLIDING) for t in types):
        raise ValueError(f"layer_types {list(types)} do not describe {n} layers")
    if window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {window}")
    if window >= max_pos or SLIDING not in types:
        return None, (FULL,) * n  # no sequence is long enough to leave the window
    return int(window), types


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, scaling dict or None, Gemma 3's local theta or None); `default` rope types
    mean no scaling."""
    params = d.get("rope_parameters")
    local = d.get("rope_local_base_freq")
    if isinstance(params, dict) and FULL in params:  # transformers 5: one dict per layer type
        local = params.get(SLIDING, {}).get("rope_theta", local)
        params = params[FULL]
    if isinstance(params, dict) and params:
        params = dict(params)
        theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = params
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
    local = float(local) if local is not None else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        scaling.pop("partial_rotary_factor", None)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return theta, None, local
        if kind not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        scaling["rope_type"] = kind
        scaling.pop("type", None)
        if kind in ("yarn", "longrope", "dynamic"):
            scaling.setdefault("max_position_embeddings", d.get("max_position_embeddings", 2048))
            orig = d.get("original_max_position_embeddings")
            if orig is not None:
                scaling.setdefault("original_max_position_embeddings", orig)
        for key, value in list(scaling.items()):
            if isinstance(value, list):
                scaling[key] = tuple(value)  # hashable: the config is frozen
    return theta, scaling, local
