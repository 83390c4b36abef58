"""decode.c's MoE block (router, top-k, every active expert's packed gate_up and down, the rank-
order sum, Qwen2-MoE's shared expert) against the torch modules it replaces, on tiny random
checkpoints converted to Q8_0 GGUFs by llama.cpp; and a row's bits alone vs among 15 others."""

from __future__ import annotations

import ctypes

import pytest
import torch

from model.inputs import StepInput
from model.layers import kernels
from model.runner import ModelRunner
from tests.model.test_fused_decode import assert_steps_match, decode_steps

pytestmark = pytest.mark.timeout(300)
KW = dict(kv_cache_memory=1 << 22)


def moe_runner(family_gguf, family_checkpoint, family: str, activation_dtype: str):
    """Q8_0 GGUFs by llama.cpp; Qwen2-MoE from its folder packed by --quantization int8 (the
    converter keeps a shared expert of 48 float, so this one's is 64 wide)."""
    if family == "qwen2_moe_shared64":
        folder = str(family_checkpoint(family))
        return ModelRunner(folder, **KW, quantization="int8", activation_dtype=activation_dtype)
    return ModelRunner(str(family_gguf(family, "q8_0")), **KW, activation_dtype=activation_dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe_shared64"])
@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_fused_moe_matches_torch_layers(family_gguf, family_checkpoint, family, activation_dtype):
    """int8: two int8 roundings of the same step (assert_like_int8, the dense test's 0.05);
    float32: the same kernels on both sides, so logits within 1e-3 and the same greedy token."""
    runner = moe_runner(family_gguf, family_checkpoint, family, activation_dtype)
    assert runner.fused is not None, "packed experts at TP 1: decode.c serves the MoE layers"
    assert all(t.moe for t in runner.fused.layers)
    prompts = [list(range(100, 137)), list(range(500, 503)), [7]]
    assert_steps_match(runner, prompts, 12, int8_tol=0.05, atol=1e-3)
    runner.shutdown()


@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_fused_moe_with_dense_layers(family_checkpoint, activation_dtype) -> None:
    """mlp_only_layers: the dense layer among sparse ones keeps decode.c's dense MLP."""
    folder = str(family_checkpoint("qwen3_moe_mlp_only"))
    runner = ModelRunner(folder, **KW, quantization="int8", activation_dtype=activation_dtype)
    assert runner.fused is not None
    assert [bool(t.moe) for t in runner.fused.layers] == [True, True, False, True]
    assert_steps_match(runner, [list(range(100, 130)), [3, 4]], 8, int8_tol=0.05, atol=1e-3)
    runner.shutdown()


@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_fused_moe_rows_alone_and_batched_are_the_same_bits(family_gguf, activation_dtype):
    """16 decode rows in one step, then each row alone in a step of its own (same slots, same
    K/V): every row's logits the same bits, whichever experts its neighbours chose. 3 threads: a
    row alone has 2 active experts (fewer than the threads: each expert's calls split across
    them), the batch has more (threads take whole experts): the same bits either way."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_rows_alone_and_batched(family_gguf, activation_dtype)
    finally:
        torch.set_num_threads(before)


def check_rows_alone_and_batched(family_gguf, activation_dtype: str) -> None:
    runner = ModelRunner(str(family_gguf("qwen3_moe", "q8_0")), **KW,
                         activation_dtype=activation_dtype)  # fmt: skip
    assert runner.fused is not None
    prompts = [[(7 * i + j) % 900 + 10 for j in range(3 + i)] for i in range(16)]
    steps = decode_steps(runner, prompts, steps=2)
    next(steps)  # the prompts are in the cache, and one decode step after them
    bs, n = runner.block_size, len(prompts)
    width = max(8, -(-(max(len(p) for p in prompts) + 2) // bs))
    tables = [[i * width + j for j in range(width)] for i in range(n)]
    pos = [len(p) + 1 for p in prompts]
    slots = [tables[i][t // bs] * bs + t % bs for i, t in enumerate(pos)]
    tokens = [(31 * i) % 900 + 5 for i in range(n)]
    batched = runner.compute_logits(StepInput(tokens, pos, slots, [1] * n, [p + 1 for p in pos],
                                              tables, list(range(n))))  # fmt: skip
    assert runner.last_path == f"fused_{activation_dtype}"
    for i in range(n):
        alone = runner.compute_logits(
            StepInput([tokens[i]], [pos[i]], [slots[i]], [1], [pos[i] + 1], [tables[i]], [0])
        )
        assert torch.equal(alone[0], batched[i]), f"row {i}"
    runner.shutdown()


def test_moe_route_matches_the_torch_router(family_gguf) -> None:
    """decode.c's moe_route against SparseMoeBlock's gate and FusedMoE.route: the same experts in
    the same rank order, weights to float32 rounding; equal probabilities rank the lower id first
    in both."""
    runner = ModelRunner(str(family_gguf("qwen3_moe", "q8_0")), **KW)
    lib = kernels.load()
    mlp = runner.model.model.layers[0].mlp
    ex = mlp.experts
    x = torch.randn(40, mlp.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    x[5] = 0.0  # every logit 0: all probabilities equal
    e, k = ex.num_experts, ex.top_k
    p = torch.empty(40, e)
    ids = torch.empty(40, k, dtype=torch.int32)
    wts = torch.empty(40, k)
    rc = lib.moe_route(mlp.gate.weight.data_ptr(), e, k, int(ex.norm_topk_prob), x.data_ptr(), 40,
                       x.shape[1], p.data_ptr(), ids.data_ptr(), wts.data_ptr(), 2)  # fmt: skip
    assert rc == 0
    with torch.inference_mode():
        logits = mlp.gate(x)
        ref_w, ref_ids = ex.route(logits)
    assert torch.equal(ids.long(), ref_ids)
    assert ref_ids[5].tolist() == list(range(k))
    torch.testing.assert_close(wts, ref_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p, torch.softmax(logits, -1), rtol=1e-6, atol=1e-7)
    assert ctypes.c_int(rc).value == 0
    runner.shutdown()
