"""benchmarks/make_moe_gguf.py: a Qwen3-MoE-shaped GGUF (stacked expert tensors) tokenmill loads
with its experts packed."""

from __future__ import annotations

from pathlib import Path

import gguf
import make_moe_gguf as moe
import pytest
import torch
from bench_helpers import BENCHMARKS  # noqa: F401  (puts benchmarks/ on sys.path)

TINY = moe.MoeShape(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
)


@pytest.fixture(scope="module")
def tiny_moe_gguf(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: str) -> Path:
    out = tmp_path_factory.mktemp("moe_gguf") / "tiny-moe-q8_0.gguf"
    moe.write_gguf(out, "q8_0", 0, smollm2_gguf, TINY)
    return out


@pytest.mark.timeout(180)
def test_written_moe_model_loads_packed(tiny_moe_gguf: Path) -> None:
    from model.runner import ModelRunner
    from tests.model.test_families_parity import Driver, prompt

    tensors = {t.name: t for t in gguf.GGUFReader(str(tiny_moe_gguf)).tensors}
    assert [int(n) for n in tensors["blk.0.ffn_gate_exps.weight"].shape] == [256, 128, 8]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    packed = ModelRunner(str(tiny_moe_gguf), activation_dtype="float32", **kw)
    plain = ModelRunner(str(tiny_moe_gguf), quantization="none", **kw)
    assert type(packed.model).__name__ == "Qwen3MoeForCausalLM"
    experts = packed.model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.weight is None and len(experts.gate_up_proj.quant) == 8
    ids = prompt(20, seed=3)
    a = packed.compute_logits(Driver(packed).step([("a", ids, 0)]))[0].log_softmax(-1)
    b = plain.compute_logits(Driver(plain).step([("a", ids, 0)]))[0].log_softmax(-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
