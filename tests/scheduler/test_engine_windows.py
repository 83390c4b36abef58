"""Sliding windows in the engine: blocks behind every layer's window go back to the pool, and
the tokens stay those of each request run alone with nothing freed (chunks, prefix hits,
preemption); a model mixing windowed and global layers frees nothing."""

from __future__ import annotations

import random

import pytest

from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from tests.model.conftest import WINDOW
from tests.scheduler.test_engine import run, tokens

pytestmark = pytest.mark.timeout(120)

BLOCK = 4
BLOCK_BYTES = 4 * 2 * 2 * 16 * 4 * BLOCK  # tiny Mistral: 4 layers x (K + V) x 2 heads x 16 dims


def workload() -> dict[str, tuple]:
    """6 prompts sharing a 24-token prefix, all past the window of 16; greedy and seeded top-k."""
    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(24)]
    reqs = {}
    for i, extra in enumerate([1, 5, 9, 14, 20, 27]):
        prompt = prefix + [rng.randrange(100, 40000) for _ in range(extra)]
        if i % 2:
            # NOTE: top_k: the tiny model's distributions are near uniform, where a float32
            # difference of batching (~2e-6) moves an inverse-CDF draw over 49152 tokens
            params = SamplingParams(
                temperature=0.8, top_k=3, seed=7 + i, max_tokens=20, ignore_eos=True
            )
        else:
            params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        reqs[f"r{i}"] = (prompt, params)
    return reqs


def engine(folder, **kw) -> LLMEngine:
    cfg = dict(
        model=str(folder),
        dtype="float32",
        device="cpu",
        block_size=BLOCK,
        kv_cache_memory=256 * BLOCK_BYTES,
    )
    return LLMEngine(EngineConfig(**(cfg | kw)))


@pytest.fixture(scope="module")
def reference(family_checkpoint):
    """Each request alone, no prefix caching, nothing freed behind the window."""
    eng = engine(family_checkpoint("mistral"), enable_prefix_caching=False)
    assert eng.block_manager.sliding_window == WINDOW
    eng.block_manager.sliding_window = None  # keep every block: the plain paged cache
    ref = {}
    for rid, req in workload().items():
        ref.update(tokens(run(eng, {rid: req})))
    assert eng.block_manager.num_window_freed_blocks == 0
    return ref


@pytest.mark.parametrize("variant", ["together", "chunked", "prefix_hits", "preemption"])
def test_window_freeing_keeps_outputs(variant, family_checkpoint, reference, assert_pool_free):
    folder, reqs = family_checkpoint("mistral"), workload()
    if variant == "together":
        eng = engine(folder)
        got = run(eng, reqs)
    elif variant == "chunked":
        eng = engine(folder, max_num_batched_tokens=8)
        got = run(eng, reqs)
        assert eng.get_stats().step_num_tokens <= 8
    elif variant == "prefix_hits":
        eng = engine(folder)
        first = dict(list(reqs.items())[:1])
        got = run(eng, first) | run(eng, {k: v for k, v in reqs.items() if k not in first})
        # 5 later prompts each reuse the shared prefix's 6 full blocks, freed or not
        assert eng.get_stats().prefix_cache_hits_total >= 5 * 24
    else:
        eng = engine(folder, kv_cache_memory=24 * BLOCK_BYTES, max_model_len=96)
        assert eng.block_manager.num_total_blocks == 24
        got = run(eng, reqs)
        assert eng.get_stats().num_preemptions_total > 0
    assert tokens(got) == reference
    # every request ends at 44..71 tokens: at least (44 - 16 + 1) // 4 = 7 blocks freed each
    assert eng.block_manager.num_window_freed_blocks >= 6 * 7
    assert_pool_free(eng)


def test_mixed_global_layers_free_nothing(family_checkpoint, assert_pool_free):
    """Gemma 3: five windowed layers, one global: the global one needs every block."""
    eng = engine(family_checkpoint("gemma3"), kv_cache_memory=256 * 6 * 2 * 2 * 16 * 4 * BLOCK)
    assert eng.model_config.sliding_window == WINDOW and not eng.model_config.all_layers_sliding
    assert eng.block_manager.sliding_window is None
    prompt, params = workload()["r5"]
    run(eng, {"long": (prompt, params)})
    assert eng.block_manager.num_window_freed_blocks == 0
    assert_pool_free(eng)
