"""Every family's tiny checkpoint converted by llama.cpp's own convert_hf_to_gguf.py, served from
the GGUF, vs transformers on the original folder (float32: same checks as the folder's parity).

The converter drops some facts (it keeps what llama.cpp reads): the transformers reference then
gets what llama.cpp assumes in their place (DROPPED), so that both serve the same model.
"""

from __future__ import annotations

import pytest
import torch

from model.gguf_weights import load_gguf
from model.runner import ModelRunner
from tests.model.conftest import FAMILIES
from tests.model.test_families_parity import CLASSES, Driver, check_against_transformers, prompt

DROPPED = {
    # query_pre_attn_scalar is not stored: llama.cpp scales by 1/sqrt(head_dim) (27B aside)
    "gemma2": {"query_pre_attn_scalar": 16},
    # no NoPE layout is stored: llama.cpp's SmolLM3 skips RoPE on every fourth layer
    "smollm3": {"no_rope_layers": [1, 1, 1, 0]},
    # MistralForCausalLM is written as "llama" with no sliding_window: full attention
    "mistral": {"sliding_window": None},
}


def reference(folder, family: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    for key, value in DROPPED.get(family, {}).items():
        setattr(config, key, value)
    if family == "mistral":
        config.layer_types = None
    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_gguf_matches_transformers(family_gguf, family_checkpoint, family) -> None:
    path = family_gguf(family)
    config = load_gguf(str(path)).config
    want = {"mistral": "LlamaForCausalLM", "qwen2_yarn": "Qwen2ForCausalLM"}
    assert config["architectures"] == [want.get(family, CLASSES[family])]
    runner = ModelRunner(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    assert type(runner.model).__name__ == CLASSES[family]
    check_against_transformers(runner, reference(family_checkpoint(family), family))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["qwen3", "phi3"])
def test_q8_0_gguf_packed_matches_its_dequantized_weights(family_gguf, family) -> None:
    """Q8_0 tensors stay packed (Phi-3's fused qkv / gate_up split as packed rows) and serve the
    same log-probs as the same file dequantized to float32 (quantization "none")."""
    path = str(family_gguf(family, "q8_0"))
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20, activation_dtype="float32")
    packed, plain = ModelRunner(path, **kw), ModelRunner(path, quantization="none", **kw)
    for layer in packed.model.model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj):
            assert linear.quant is not None and linear.quant.fmt.bits == 8
    assert packed.fused is not None  # decode.c: Qwen3's q/k norms, Phi-3's partial rotary
    ids = prompt(37, seed=1)
    a = packed.compute_logits(Driver(packed).step([("a", ids, 0)]))[0].log_softmax(-1)
    b = plain.compute_logits(Driver(plain).step([("a", ids, 0)]))[0].log_softmax(-1)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
