"""Prompt logprobs from the engine equal transformers' float32 log_softmax, across chunked
prefill, a would-be prefix-cache hit, n > 1 and a preempted recompute."""

from __future__ import annotations

import random

import pytest
import torch

from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine

pytestmark = pytest.mark.timeout(120)

BLOCK_BYTES = 8192  # tiny model, float32, 16 tokens a block


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint(), dtype=torch.float32).eval()


def hf_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [T, vocab]
    return logits.log_softmax(dim=-1)


def make_engine(tiny_checkpoint, **kw) -> LLMEngine:
    cfg = dict(model=str(tiny_checkpoint()), dtype="float32", device="cpu")
    return LLMEngine(EngineConfig(**(cfg | dict(kv_cache_memory=256 * BLOCK_BYTES) | kw)))


def drain(engine: LLMEngine) -> dict[str, list]:
    """request id -> the prompt_logprobs its outputs carried (exactly one output carries them)."""
    got: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.prompt_logprobs is not None:
                assert out.request_id not in got
                got[out.request_id] = out.prompt_logprobs
    return got


def check(lps: list, ref: torch.Tensor, ids: list[int], k: int, rank_slack: int = 0) -> None:
    """Exact ids and ranks (`rank_slack`: a sum in another order may swap a near-tie)."""
    assert len(lps) == len(ids) and lps[0] is None
    for p in range(1, len(ids)):
        lp, row = lps[p], ref[p - 1]
        assert lp.token_id == ids[p]
        assert abs(lp.logprob - row[ids[p]].item()) < 1e-3, p
        assert abs(lp.rank - int((row > row[ids[p]]).sum()) - 1) <= rank_slack
        top_v, top_i = row.topk(k)
        assert [t for t, _ in lp.top] == top_i.tolist()
        diffs = [abs(v - r) for (_, v), r in zip(lp.top, top_v.tolist(), strict=True)]
        assert max(diffs, default=0.0) < 1e-3


def test_prompt_logprobs_match_transformers_chunked_and_past_the_prefix_cache(
    tiny_checkpoint, hf_model, assert_pool_free
):
    rng = random.Random(1)
    prefix = [rng.randrange(100, 40000) for _ in range(40)]
    prompt = prefix + [rng.randrange(100, 40000) for _ in range(13)]
    # 16-token steps: the 53-token prompt prefills in 4 chunks
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=16)
    engine.add_request("warm", prefix + [7, 8], SamplingParams(max_tokens=1))
    assert drain(engine) == {}  # no prompt logprobs unless asked
    assert engine.block_manager.num_cached_free_blocks == 2  # the prefix could be a hit
    params = SamplingParams(max_tokens=2, prompt_logprobs=3, n=2, temperature=0.0)
    engine.add_request("p", prompt, params)
    got = drain(engine)
    check(got["p"], hf_prompt_logprobs(hf_model, prompt), prompt, 3)
    assert_pool_free(engine)


def test_prompt_logprobs_survive_preemption_and_a_one_token_prompt(
    tiny_checkpoint, hf_model, assert_pool_free
):
    rng = random.Random(2)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (45, 38, 1)]
    # 7 blocks of 16 tokens: two 40-token prompts growing by 20 tokens cannot both stay
    engine = make_engine(tiny_checkpoint, kv_cache_memory=7 * BLOCK_BYTES)
    for i, ids in enumerate(prompts):
        params = SamplingParams(max_tokens=20, ignore_eos=True, prompt_logprobs=0)
        engine.add_request(f"r{i}", ids, params)
    got = drain(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, ids in enumerate(prompts):
        check(got[f"r{i}"], hf_prompt_logprobs(hf_model, ids), ids, 0)
    assert got["r2"] == [None]
    assert_pool_free(engine)


def test_one_token_chunks_score_through_the_decode_kernel_path(tiny_checkpoint, assert_pool_free):
    """With a 2-token budget beside a decoding request, every step is decode-shaped (decode.c on
    packed weights): the prompt scores as in one torch-path prefill."""
    # NOTE: the exact path (float32 activations): decode.c and the torch layers round alike
    exact = {"quantization": "int8", "activation_dtype": "float32"}
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=2, **exact)
    if engine.runner.fused is None:
        pytest.skip("no C compiler: decode.c is not built")
    prompt = [300 + 11 * i for i in range(9)]
    engine.add_request("decoding", [5], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))
    fused = drain(engine)["p"]
    alone = make_engine(tiny_checkpoint, **exact)
    alone.add_request("p", prompt, SamplingParams(max_tokens=1, prompt_logprobs=2))
    ref = drain(alone)["p"]
    assert fused[0] is None and len(fused) == len(ref) == len(prompt)
    for a, b in zip(fused[1:], ref[1:], strict=True):
        assert a.token_id == b.token_id and abs(a.rank - b.rank) <= 1  # near-ties may swap
        assert abs(a.logprob - b.logprob) < 1e-3
    assert_pool_free(engine)


@pytest.mark.timeout(180)
def test_prompt_logprobs_under_tensor_parallelism(tiny_checkpoint, hf_model, assert_pool_free):
    """Both ranks project the prompt rows (the head's gather is a collective); rank 0 scores."""
    ids = [400 + 13 * i for i in range(40)]
    engine = make_engine(
        tiny_checkpoint,
        tensor_parallel_size=2,
        kv_cache_memory=64 * 4096,
        max_num_batched_tokens=16,
    )
    try:
        engine.add_request("p", ids, SamplingParams(max_tokens=2, prompt_logprobs=2))
        # NOTE: all-reduced partial sums round differently: a near-tie among 49k may swap a rank
        check(drain(engine)["p"], hf_prompt_logprobs(hf_model, ids), ids, 2, rank_slack=1)
        assert_pool_free(engine)
    finally:
        engine.shutdown()


def test_a_long_chunk_projects_in_slices(tiny_checkpoint, hf_model, assert_pool_free):
    """300 prompt positions in one step: projected PROMPT_LOGPROB_ROWS (256) at a time."""
    from model.runner import PROMPT_LOGPROB_ROWS

    ids = [500 + 7 * i for i in range(300)]
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=512)
    engine.add_request("p", ids, SamplingParams(max_tokens=1, prompt_logprobs=1))
    assert len(ids) - 1 > PROMPT_LOGPROB_ROWS
    # NOTE: 300 positions of another attention kernel: a near-tie among 49k may swap a rank
    check(drain(engine)["p"], hf_prompt_logprobs(hf_model, ids), ids, 1, rank_slack=1)
    assert engine.num_steps == 1
    assert_pool_free(engine)
