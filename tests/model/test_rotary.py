"""RoPE scalings and partial rotary vs transformers' own rotary embeddings, position by position."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.layers.rotary import RotaryEmbedding

POSITIONS = [0, 1, 7, 47, 48, 49, 63, 100, 1000]


def hf_and_ours(hf_model) -> tuple[torch.nn.Module, RotaryEmbedding]:
    d = hf_model.config.to_dict()
    d["architectures"] = [type(hf_model).__name__]
    cfg = ModelConfig.from_hf_dict(d)
    return hf_model.model.rotary_emb, RotaryEmbedding(
        cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict
    )


def llama_with(rope: dict, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=kw.pop("max_position_embeddings", 4096),
        rope_parameters=rope,
        **kw,
    )
    return LlamaForCausalLM(cfg)


def assert_same_angles(hf_rope, ours: RotaryEmbedding, positions: list[int]) -> None:
    """One position per forward: transformers' longrope switch reads the longest position."""
    x = torch.zeros(1, 1, ours.rotary_dim)
    for p in positions:
        cos, sin = hf_rope(x, torch.tensor([[p]]))  # [1, 1, rotary_dim], rotate_half layout
        oc, os_ = ours.cos_sin(torch.tensor([p]), torch.float32)  # [1, 1, rotary_dim]
        half = ours.rotary_dim // 2
        torch.testing.assert_close(oc[0, 0], cos[0, 0], atol=1e-6, rtol=1e-5, msg=f"cos @ {p}")
        torch.testing.assert_close(os_[0, 0, half:], sin[0, 0, half:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(-os_[0, 0, :half], sin[0, 0, :half], atol=1e-6, rtol=1e-5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "rope_theta": 1e6,
        },
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 16,
            "beta_slow": 2,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "rope_theta": 10000.0,
        },
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ],
    ids=["linear", "dynamic", "yarn", "yarn_mscale", "llama3"],
)
def test_scalings_match_transformers(rope: dict) -> None:
    hf_rope, ours = hf_and_ours(llama_with(dict(rope)))
    assert_same_angles(hf_rope, ours, POSITIONS)
    if rope["rope_type"] == "yarn":
        assert ours.attention_scaling > 1.0  # the cos/sin factor is applied, not only frequencies


@pytest.mark.timeout(30)
def test_phi3_partial_longrope_switches_at_the_original_length() -> None:
    """Partial rotary (12 of 16 dims) with LongRoPE: short factors below 48, long ones from 48."""
    from tests.model.conftest import family_model

    torch.manual_seed(0)
    hf_rope, ours = hf_and_ours(family_model("phi3_longrope"))
    assert ours.rotary_dim == 12 and ours.long_from == 48
    assert_same_angles(hf_rope, ours, POSITIONS)
    # one batch holding both sides of the switch: each token keeps its own table
    cos, _ = ours.cos_sin(torch.tensor([47, 48]), torch.float32)
    for row, p in enumerate((47, 48)):
        torch.testing.assert_close(cos[row], ours.cos_sin(torch.tensor([p]), torch.float32)[0][0])
    assert (cos[0] - cos[1]).abs().max() > 0.1
