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


LLAMA_QUANTIZE = Path.home() / ".cache/llama-server-peer/llama.cpp/build/bin/llama-quantize"


@pytest.mark.timeout(300)
def test_q4_k_m_experts_match_the_int8_reference(tmp_path: Path, smollm2_gguf: str) -> None:
    """The benchmark's pipeline at a tiny shape: F16 from the script, Q4_K_M by llama-quantize;
    each expert's product on the int8 path equals qdot's reference on the file's own blocks,
    and the float path serves the dequantized file's log-probs."""
    import subprocess

    from model.gguf_weights import load_gguf
    from model.layers.experts import packed_linear
    from model.layers.qdot import cat_blocks, reference_linear
    from model.runner import ModelRunner
    from tests.model.test_families_parity import Driver, prompt

    if not LLAMA_QUANTIZE.is_file():
        pytest.skip(f"no llama-quantize at {LLAMA_QUANTIZE}")
    shape = moe.MoeShape(**{**TINY.__dict__, "moe_intermediate_size": 256})  # whole K-blocks
    src, out = tmp_path / "f16.gguf", tmp_path / "q4_k_m.gguf"
    moe.write_gguf(src, "f16", 0, smollm2_gguf, shape)
    env = {"LD_LIBRARY_PATH": str(LLAMA_QUANTIZE.parent)}
    done = subprocess.run([LLAMA_QUANTIZE, src, out, "Q4_K_M"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]
    kw = dict(dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    int8 = ModelRunner(str(out), activation_dtype="int8", **kw)
    ckpt = load_gguf(str(out))
    experts = int8.model.model.layers[1].mlp.experts
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.experts.{}_proj.weight"
    gate, up, down = (ckpt.get(name.format(p), True, True) for p in ("gate", "up", "down"))
    assert gate.kind == "Q4_K"
    for e in (0, 7):
        ref = reference_linear(x, cat_blocks([gate.expert(e), up.expert(e)])).float()
        torch.testing.assert_close(packed_linear(x, experts.gate_up_proj.quant[e]), ref)
        ref = reference_linear(x, down.expert(e)).float()
        torch.testing.assert_close(packed_linear(x, experts.down_proj.quant[e]), ref)
    ids = prompt(20, seed=3)
    logprobs = []
    for k in (dict(activation_dtype="float32"), dict(quantization="none")):
        runner = ModelRunner(str(out), **kw, **k)
        logprobs.append(runner.compute_logits(Driver(runner).step([("a", ids, 0)]))[0])
    torch.testing.assert_close(logprobs[0].log_softmax(-1), logprobs[1].log_softmax(-1))
