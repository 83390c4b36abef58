"""Tiny random checkpoints of every supported family, built with transformers' own classes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

WINDOW = 16  # small enough that every run crosses it (prompts of 37 tokens + 32 steps)
FAMILY_DIMS = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=0.1,  # peaky logits: greedy parity never rides on a float32 near-tie
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FULL, SLIDING = "full_attention", "sliding_attention"
FAMILIES = ("qwen3", "gemma2", "gemma3", "smollm3", "granite", "phi3", "mistral")


def family_model(name: str):
    """A random float32 transformers model of one family, shaped to exercise what sets it apart."""
    import transformers as tf

    d = dict(FAMILY_DIMS)
    if name == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**d, head_dim=32, rope_theta=1e6))
    if name == "gemma2":
        cfg = tf.Gemma2Config(
            **d,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=6.0,
        )
        return tf.Gemma2ForCausalLM(cfg)
    if name == "gemma3":
        rope = {
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
            FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        }
        cfg = tf.Gemma3TextConfig(
            **d,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=[SLIDING, FULL, SLIDING, SLIDING],
            rope_parameters=rope,
        )
        return tf.Gemma3ForCausalLM(cfg)
    if name == "smollm3":
        return tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**d, no_rope_layers=[1, 0, 1, 0]))
    if name == "granite":
        cfg = tf.GraniteConfig(
            **d,
            embedding_multiplier=12.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=0.5,
        )
        return tf.GraniteForCausalLM(cfg)
    if name in ("phi3", "phi3_longrope"):
        # head_dim 16, rotary 12 of it: 6 frequencies per table
        # phi3_longrope: positions from 48 on take the long factors (tests/model/test_rotary.py)
        orig = 4096 if name == "phi3" else 48
        rope = dict(
            rope_type="longrope",
            rope_theta=10000.0,
            partial_rotary_factor=0.75,
            short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
            original_max_position_embeddings=orig,
        )
        d["max_position_embeddings"] = 2 * orig
        cfg = tf.Phi3Config(**d, rope_parameters=rope, original_max_position_embeddings=orig)
        return tf.Phi3ForCausalLM(cfg)
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**d, head_dim=16, sliding_window=WINDOW))
    raise ValueError(name)


def build_family_checkpoint(out: Path, tokenizer_dir: Path, name: str, seed: int = 0) -> Path:
    """Save one family's random checkpoint (config, safetensors, SmolLM2's tokenizer) to `out`.

    Norm weights are randomized too (transformers initializes them to 1, or 0 for Gemma's 1 + w):
    a q/k norm or a post-norm that the port skipped would otherwise go unnoticed.
    """
    import torch

    torch.manual_seed(seed)
    model = family_model(name).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and "norm" in pname:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path):
    """Factory: family_checkpoint(name) -> folder, built once per session."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"family_{name}")
            cache[name] = build_family_checkpoint(out, smollm2_tokenizer_dir, name)
        return cache[name]

    return make
