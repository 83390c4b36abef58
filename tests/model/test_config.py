"""ModelConfig from the config.json files the hub's checkpoints ship (pre-transformers-5 keys)."""

from __future__ import annotations

import pytest

from model.config import FULL, SLIDING, ModelConfig

pytestmark = pytest.mark.timeout(10)


def test_gemma3_1b_hub_config() -> None:
    """rope_local_base_freq and sliding_window_pattern, no layer_types: five of six sliding."""
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["Gemma3ForCausalLM"],
            "vocab_size": 262144,
            "hidden_size": 1152,
            "intermediate_size": 6912,
            "num_hidden_layers": 26,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "max_position_embeddings": 32768,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": None,
        }
    )
    assert cfg.layer_types[:6] == (SLIDING,) * 5 + (FULL,)
    assert [i for i in range(26) if not cfg.is_sliding(i)] == [5, 11, 17, 23]
    assert (cfg.sliding_window, cfg.rope_theta, cfg.rope_local_theta) == (512, 1e6, 1e4)
    assert cfg.qk_norm and cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh"
    assert not cfg.all_layers_sliding and cfg.final_logit_softcapping is None


def test_gemma2_without_layer_types_slides_on_even_layers() -> None:
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["Gemma2ForCausalLM"],
            "vocab_size": 256000,
            "hidden_size": 2304,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "sliding_window": 4096,
            "max_position_embeddings": 8192,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 256,
        }
    )
    assert cfg.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)


def test_phi3_longrope_and_a_window_past_the_context() -> None:
    """Phi-3-mini-128k: `type` longrope, lists become tuples, a window it never leaves."""
    cfg = ModelConfig.from_hf_dict(
        {
            "architectures": ["Phi3ForCausalLM"],
            "vocab_size": 32064,
            "hidden_size": 3072,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope", "long_factor": [1.0, 2.0], "short_factor": [1.0]},
            "sliding_window": 262144,
            "partial_rotary_factor": 0.75,
        }
    )
    s = cfg.rope_scaling_dict
    assert s["rope_type"] == "longrope" and s["long_factor"] == (1.0, 2.0)
    assert (s["original_max_position_embeddings"], s["max_position_embeddings"]) == (4096, 131072)
    assert cfg.sliding_window is None and cfg.rotary_dim == 72


def test_qwen3_window_is_off_unless_used_and_mistral_windows_every_layer() -> None:
    base = {
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 4096,
        "sliding_window": 1024,
    }
    qwen = ModelConfig.from_hf_dict(dict(base, architectures=["Qwen3ForCausalLM"]))
    assert qwen.sliding_window is None and qwen.layer_types == (FULL,) * 3
    used = ModelConfig.from_hf_dict(
        dict(base, architectures=["Qwen3ForCausalLM"], use_sliding_window=True, max_window_layers=1)
    )
    assert used.layer_types == (FULL, SLIDING, SLIDING) and not used.all_layers_sliding
    mistral = ModelConfig.from_hf_dict(dict(base, architectures=["MistralForCausalLM"]))
    assert mistral.all_layers_sliding and mistral.sliding_window == 1024
    with pytest.raises(ValueError, match=r"layer_types \['full_attention'\] do not describe 3"):
        ModelConfig.from_hf_dict(dict(base, architectures=["Qwen3ForCausalLM"], layer_types=[FULL]))


def test_yarn_and_unknown_rope_types() -> None:
    base = {
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 131072,
    }
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = ModelConfig.from_hf_dict(dict(base, rope_scaling=yarn))
    assert cfg.rope_scaling_dict == dict(yarn, max_position_embeddings=131072)
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'mrope'"):
        ModelConfig.from_hf_dict(dict(base, rope_scaling={"rope_type": "mrope", "factor": 1.0}))


def test_smollm3_nope_layers_from_the_interval() -> None:
    base = {
        "architectures": ["SmolLM3ForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
    }
    cfg = ModelConfig.from_hf_dict(dict(base, no_rope_layer_interval=4))
    assert [cfg.uses_rope(i) for i in range(8)] == [True, True, True, False] * 2
    assert ModelConfig.from_hf_dict(base).rope_layers == ()
    with pytest.raises(ValueError, match="no_rope_layers has 2 entries for 8 layers"):
        ModelConfig.from_hf_dict(dict(base, no_rope_layers=[1, 0]))
