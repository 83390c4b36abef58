"""CUDA graphs and bfloat16 on CUDA against transformers (skipped without a GPU;
benchmarks/gpu_checks.py runs these and the speed table), and what a graph replays, run eagerly
on the CPU: padded rows and padded context must not change the real rows."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_checks import exactness, graphs_vs_eager
from model.cuda_graphs import CUDAGraphs
from model.layers.attention import AttentionMetadata
from model.runner import ModelRunner
from tests.model.test_llama_parity import Driver, prompt

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("num_seqs", [1, 3, 5])
def test_padded_decode_matches_eager(tiny_checkpoint, num_seqs: int) -> None:
    """Rows padded to the batch bucket write into the spare block; context padded to the block
    bucket is masked: every real row's hidden state is the eager decode's, and no real block is
    written by a padded row."""
    runner = ModelRunner(str(tiny_checkpoint("llama")), dtype="float32", device="cpu",
                         kv_cache_memory=4 << 20)  # fmt: skip
    drv = Driver(runner)
    pad = drv.free.pop()
    graphs = CUDAGraphs(runner.model, runner.block_size, runner.max_model_len, pad)
    lens = [3, 17, 40, 70, 33][:num_seqs]
    prompts = {f"s{i}": prompt(n, seed=i) for i, n in enumerate(lens)}
    runner.forward_step(drv.step([(sid, p, 0) for sid, p in prompts.items()]))
    step = drv.step([(sid, [7 + i], len(p)) for i, (sid, p) in enumerate(prompts.items())])
    with torch.inference_mode():
        b, nb = graphs.shape(step)
        assert b > num_seqs or num_seqs == 1
        real = [blk for t in drv.tables.values() for blk in t]
        before = [k.clone() for k, _ in runner.kv_cache]
        graphs.load(step, b, nb)
        padded = graphs.forward(b, nb)[:num_seqs].clone()
        by_graph = torch.stack([k[:, real].clone() for k, _ in runner.kv_cache])
        for (k, _), old in zip(runner.kv_cache, before, strict=True):
            k.copy_(old)  # the eager step writes the same slots again, from the same cache
        meta = AttentionMetadata.build(step.query_lens, step.context_lens, step.block_tables,
                                       step.slot_mapping, runner.block_size)  # fmt: skip
        ids = torch.tensor(step.input_ids)
        eager = runner.model(ids, torch.tensor(step.positions), meta)
        by_eager = torch.stack([k[:, real] for k, _ in runner.kv_cache])
    torch.testing.assert_close(by_graph, by_eager, atol=1e-6, rtol=1e-6)  # no real slot else
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("qwen2", True)])
def test_cuda_matches_transformers(tiny_checkpoint, arch: str, tie: bool, dtype: str) -> None:
    """float32 within 2e-3 in logprob; bfloat16 within 0.25, greedy mismatches only near-ties."""
    figure, ok = exactness(tiny_checkpoint(arch, tie), dtype, "cuda", 32)
    assert ok, figure


@cuda
def test_cuda_graphs_decode_as_eager(tiny_checkpoint) -> None:
    """Greedy tokens identical with and without graphs at 1, 5, 16 and 64 sequences (float32)."""
    figure, identical, captured = graphs_vs_eager(tiny_checkpoint("llama"), "float32", "cuda", 32)
    assert identical and captured > 0, figure
