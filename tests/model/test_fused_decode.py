"""decode.c (every decoder layer of a decode step in one call) against the torch modules it
replaces, on the same steps and the same KV cache; and that serving really takes it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from model.inputs import StepInput
from model.layers import kernels
from model.layers.fused_decode import FusedDecode
from model.runner import ModelRunner

pytestmark = pytest.mark.timeout(180)


def decode_steps(runner: ModelRunner, prompts: list[list[int]], steps: int):
    """Prefill each prompt (torch path), then decode all rows together for `steps` steps; at each
    step the logits come from decode.c and from the torch modules (same slots rewritten)."""
    bs, fused = runner.block_size, runner.fused
    assert fused is not None
    width = max(8, -(-(max(len(p) for p in prompts) + steps) // bs))  # blocks a sequence needs
    tables = [[i * width + j for j in range(width)] for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        slots = [tables[i][t // bs] * bs + t % bs for t in range(len(p))]
        runner.fused = None
        runner.compute_logits(StepInput(p, list(range(len(p))), slots, [len(p)], [len(p)],
                                        [tables[i]], [0]))  # fmt: skip
    token = [p[-1] for p in prompts]
    for _ in range(steps):
        pos = lens[:]
        slots = [tables[i][t // bs] * bs + t % bs for i, t in enumerate(pos)]
        lens = [n + 1 for n in lens]
        step = StepInput(token, pos, slots, [1] * len(prompts), lens, tables,
                         list(range(len(prompts))))  # fmt: skip
        runner.fused = None
        ref = runner.compute_logits(step)
        runner.fused = fused
        got = runner.compute_logits(step)
        yield got, ref
        token = [int(t) for t in ref.argmax(-1)]


def assert_steps_match(runner, prompts, steps: int, *, atol, rtol=None, int8_tol=None) -> None:
    """decode.c against the torch layers at every decode step: int8 activations as two int8
    roundings (assert_like_int8, int8_tol); float32 within atol (rtol: atol unless given) and the
    same greedy token."""
    for got, ref in decode_steps(runner, prompts, steps):
        if runner.activation_dtype == "int8":
            assert int8_tol is not None, "an int8 runner needs int8_tol"
            assert_like_int8(got, ref, int8_tol)
            continue
        torch.testing.assert_close(got, ref, rtol=atol if rtol is None else rtol, atol=atol)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize(
    "arch,tie,quantization,threads",
    [
        ("llama", False, "int4", None),
        ("qwen2", True, "int8", None),
        ("llama3", True, "int4", None),
        ("llama", True, "int8", 3),  # attention runs split across 3 threads unevenly
    ],
)
@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_fused_decode_matches_torch_layers(
    tiny_checkpoint, arch, tie, quantization, threads, activation_dtype
) -> None:
    """The same linear kernels on both sides: float32 agrees to rounding, int8 as two int8
    roundings of the same step (see assert_like_int8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        runner = ModelRunner(
            str(tiny_checkpoint(arch, tie)),
            quantization=quantization,
            kv_cache_memory=1 << 22,
            activation_dtype=activation_dtype,
        )
        assert runner.activation_dtype == activation_dtype
        assert runner.fused is not None, "packed CPU float32 model at tp=1: decode.c serves it"
        prompts = [list(range(100, 137)), list(range(500, 503)), [7]]
        assert_steps_match(runner, prompts, 24, int8_tol=0.05, atol=1e-4)
        runner.shutdown()
    finally:
        torch.set_num_threads(before)


def test_fused_decode_with_a_float16_kv_cache(tiny_checkpoint) -> None:
    """decode.c stores K/V as float16 rounded as torch's .half() and reads them back widened:
    the torch modules on the same cache agree to float32 rounding."""
    runner = ModelRunner(str(tiny_checkpoint("llama", True)), quantization="int4",
                         kv_cache_memory=1 << 22, activation_dtype="float32",
                         kv_cache_dtype="float16")  # fmt: skip
    assert runner.fused is not None and runner.kv_cache[0][0].dtype == torch.float16
    prompts = [list(range(100, 137)), list(range(500, 503))]
    assert_steps_match(runner, prompts, 12, atol=1e-4)
    runner.shutdown()


@pytest.mark.parametrize(
    "block_size,kv_cache_dtype", [(16, "auto"), (8, "auto"), (16, "float16"), (32, "auto")]
)
def test_fused_decode_on_the_smollm2_gguf(smollm2_gguf, block_size, kv_cache_dtype) -> None:
    """Head size 64 (decode.c's unrolled attention): 16 keys a tree, a run's short last chunk,
    and (block size 8) chunks whose keys span two blocks. A float16 cache rounds K/V that the two
    paths computed a float32 ulp apart, and a value at a float16 rounding boundary then differs
    by a float16 ulp (2^-11): logits agree to ~1e-3 there, not 5e-4."""
    runner = ModelRunner(smollm2_gguf, kv_cache_memory=1 << 26, activation_dtype="float32",
                         block_size=block_size, kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    assert runner.fused is not None
    prompts = [list(range(1000, 1100)), [1, 2, 3]]
    atol = 5e-4 if kv_cache_dtype == "auto" else 3e-3
    assert_steps_match(runner, prompts, 8, atol=atol, rtol=1e-4)
    runner.shutdown()


def assert_like_int8(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Once an attention rounding difference (C vs torch) flips one activation's int8 rounding,
    the paths differ as two int8 roundings do: the chosen token's logprob within tol, the greedy
    token the same wherever the runner-up is tol behind (a wrong part offset or a scratch
    overlap gives garbage, far outside this)."""
    lg, lr = got.log_softmax(-1), ref.log_softmax(-1)
    top = lr.argmax(-1, keepdim=True)
    assert (lg.gather(1, top) - lr.gather(1, top)).abs().max() < tol
    top2 = lr.topk(2, -1).values
    clear = top2[:, 0] - top2[:, 1] > tol
    assert torch.equal(got.argmax(-1)[clear], top[:, 0][clear])


def test_fused_int8_decode_on_the_smollm2_gguf(smollm2_gguf) -> None:
    runner = ModelRunner(smollm2_gguf, kv_cache_memory=1 << 26, activation_dtype="int8")
    assert runner.fused is not None
    prompts = [list(range(1000, 1100)), [1, 2, 3], list(range(2000, 2050))]
    for got, ref in decode_steps(runner, prompts, steps=8):
        assert_like_int8(got, ref, 0.3)  # two int8 roundings, each within 0.25 of transformers
    runner.shutdown()


def test_fused_decode_only_where_it_fits(tiny_checkpoint) -> None:
    folder = str(tiny_checkpoint("llama"))
    assert ModelRunner(folder, kv_cache_memory=1 << 20).fused is None  # float weights: torch
    assert ModelRunner(folder, quantization="int8", kv_cache_dtype="bfloat16",
                       kv_cache_memory=1 << 20).fused is None  # fmt: skip
    assert ModelRunner(folder, quantization="int8", kv_cache_memory=1 << 20).fused is not None
    assert ModelRunner(folder, quantization="int8", kv_cache_memory=1 << 20,
                       fused_step=False).fused is None  # fmt: skip
    assert FusedDecode.takes([1, 1, 1]) and FusedDecode.takes([1, 40]) and not FusedDecode.takes([])


def test_choose_path_names_what_served_each_step(smollm2_gguf, tiny_checkpoint) -> None:
    """decode.c serves decode, prefill and mixed steps of a model it fits; the torch modules the
    rest; the label carries the activation dtype (tokenmill_model_steps_total{path=...})."""
    prefill = StepInput([1, 2, 3], [0, 1, 2], [0, 1, 2], [3], [3], [[0]], [0])
    for act in ("int8", "float32"):
        runner = ModelRunner(smollm2_gguf, kv_cache_memory=1 << 24, activation_dtype=act)
        served = []
        for _ in decode_steps(runner, [list(range(1000, 1020)), [5, 6]], steps=2):
            served.append(runner.last_path)
        assert served == [f"fused_{act}"] * 2
        runner.compute_logits(prefill)
        assert runner.last_path == f"fused_{act}"
        runner.shutdown()
    runner = ModelRunner(str(tiny_checkpoint("llama")), kv_cache_memory=1 << 20)
    runner.compute_logits(prefill)
    assert runner.last_path == "torch_float32"  # float weights: decode.c does not take them


@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_prefill_and_mixed_steps_match_torch_and_are_row_invariant(
    smollm2_gguf, activation_dtype
) -> None:
    """A prompt chunk, then a mixed step (one decode row beside a second prompt's chunk): decode.c
    against the torch modules, and each row's hidden state the same bits as when that row's
    sequence runs alone in a step of its own."""
    runner = ModelRunner(smollm2_gguf, kv_cache_memory=1 << 26, activation_dtype=activation_dtype)
    bs, fused = runner.block_size, runner.fused
    assert fused is not None

    def slots(table, start, n):
        return [table[t // bs] * bs + t % bs for t in range(start, start + n)]

    a, b = list(range(1000, 1090)), list(range(3000, 3070))  # 90 and 70 prompt tokens
    ta, tb = list(range(0, 8)), list(range(8, 16))
    first = StepInput(a, list(range(90)), slots(ta, 0, 90), [90], [90], [ta], [0])
    mixed = StepInput([a[-1]] + b[:40], [90] + list(range(40)), slots(ta, 90, 1) + slots(tb, 0, 40),
                      [1, 40], [91, 40], [ta, tb], [0, 1])  # fmt: skip
    runner.fused = fused
    got = [runner.compute_logits(first), runner.compute_logits(mixed)]
    # the mixed step's rows again, each sequence alone (same slots, same K/V): the same bits
    alone_a = runner.compute_logits(
        StepInput([a[-1]], [90], slots(ta, 90, 1), [1], [91], [ta], [0])
    )
    alone_b = runner.compute_logits(StepInput(b[:40], list(range(40)), slots(tb, 0, 40), [40],
                                              [40], [tb], [0]))  # fmt: skip
    assert torch.equal(alone_a[0], got[1][0]) and torch.equal(alone_b[0], got[1][1])
    runner.fused = None
    ref = [runner.compute_logits(first), runner.compute_logits(mixed)]
    for g, r in zip(got, ref, strict=True):
        if activation_dtype == "int8":
            assert_like_int8(g, r, 0.3)
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=5e-4)
    runner.shutdown()


def test_out_of_range_slots_and_blocks_are_refused(smollm2_gguf) -> None:
    """A block or slot id past the KV cache is an error before any kernel writes there."""
    runner = ModelRunner(smollm2_gguf, kv_cache_memory=1 << 22)
    n = runner.num_kv_blocks
    bad_block = StepInput([1], [0], [0], [1], [1], [[n]], [0])
    bad_slot = StepInput([1], [0], [n * runner.block_size], [1], [1], [[0]], [0])
    negative = StepInput([1], [0], [-1], [1], [1], [[0]], [0])
    for step in (bad_block, bad_slot, negative):
        with pytest.raises(ValueError, match="out of range"):
            runner.compute_logits(step)
    runner.shutdown()


@pytest.mark.skipif("TOKENMILL_CPU_ISA" not in os.environ, reason="run by the capped-ISA test")
def test_the_kernels_are_built_for_the_capped_isa() -> None:
    assert kernels.int8_isa(kernels.load()) == os.environ["TOKENMILL_CPU_ISA"]


@pytest.mark.timeout(600)
@pytest.mark.skipif("TOKENMILL_CPU_ISA" in os.environ, reason="already capped")
def test_an_avx2_host_runs_the_same_steps(smollm2_gguf) -> None:
    """Hosts without AVX-512 (AMD Zen 3) build decode.c and qdot.c's panels for AVX2: this
    module's int8 GGUF test passes in a process whose kernels are capped to it."""
    if kernels.load("avx2") is None:
        pytest.skip("this host cannot build the AVX2 kernels")
    select = "capped_isa or fused_int8_decode_on_the_smollm2"
    env = {**os.environ, "TOKENMILL_CPU_ISA": "avx2"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", select]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
