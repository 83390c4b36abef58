"""Pooling requests in the engine: prefill-only, chunked, against transformers' hidden states;
LAST reuses the prefix cache, MEAN does not; blocks freed at once; the runner kinds refuse each
other's requests."""

from __future__ import annotations

import random

import pytest
import torch

from model.sampling_params import SamplingParams, SamplingParamsError
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine

pytestmark = pytest.mark.timeout(120)

BLOCK_BYTES = 8192  # tiny model, float32, 16 tokens a block


@pytest.fixture(scope="module")
def hf_base(tiny_checkpoint):
    """transformers' base model of the tiny causal LM (no head): the hidden-state oracle."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_checkpoint(), dtype=torch.float32).eval()


def hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).last_hidden_state[0]  # [T, hidden]


def pooling_engine(tiny_checkpoint, pooler: dict, **kw) -> LLMEngine:
    cfg = dict(model=str(tiny_checkpoint()), dtype="float32", device="cpu", runner="pooling")
    cfg |= dict(kv_cache_memory=64 * BLOCK_BYTES, max_num_batched_tokens=16, pooler_config=pooler)
    return LLMEngine(EngineConfig(**(cfg | kw)))


def embed(engine: LLMEngine, prompts: dict[str, list[int]]) -> dict[str, list[float]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, None)
    got: dict[str, list[float]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.finished and out.request_id not in got
            assert out.outputs[0].finish_reason == "stop" and out.outputs[0].num_tokens == 0
            got[out.request_id] = out.embedding
    return got


def prompts(seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(100, 40000) for _ in range(40)]
    lens = {"a": 1, "b": 15, "c": 23}
    out = {k: [rng.randrange(100, 40000) for _ in range(n)] for k, n in lens.items()}
    return out | {"d": shared + [5, 6], "e": shared + [7, 8, 9]}


def test_mean_pooling_over_chunks_equals_transformers(tiny_checkpoint, hf_base, assert_pool_free):
    engine = pooling_engine(tiny_checkpoint, {"pooling_type": "MEAN", "normalize": False})
    reqs = prompts(0)
    got = embed(engine, reqs)
    for rid, ids in reqs.items():
        want = hidden(hf_base, ids).mean(dim=0)
        assert (torch.tensor(got[rid]) - want).abs().max().item() < 1e-4, rid
    assert engine.block_manager.prefix_hits == 0  # MEAN needs every position: no hits
    assert_pool_free(engine)


def test_last_token_pooling_reuses_the_prefix_cache(tiny_checkpoint, hf_base, assert_pool_free):
    engine = pooling_engine(tiny_checkpoint, {"pooling_type": "LAST"})
    reqs = prompts(1)
    got = embed(engine, reqs)
    for rid, ids in reqs.items():
        want = torch.nn.functional.normalize(hidden(hf_base, ids)[-1], dim=0)
        assert (torch.tensor(got[rid]) - want).abs().max().item() < 1e-5, rid
    assert engine.block_manager.prefix_hits == 32  # e's 2 full shared blocks, cached by d
    assert engine.block_manager.num_cached_free_blocks > 0
    assert_pool_free(engine)


def test_each_runner_refuses_the_other_kind(tiny_checkpoint) -> None:
    engine = pooling_engine(tiny_checkpoint, {})
    with pytest.raises(SamplingParamsError, match="--runner pooling: it embeds"):
        engine.add_request("g", [5, 6], SamplingParams())
    with pytest.raises(SamplingParamsError, match="input has 1025 tokens > max_model_len 1024"):
        engine.add_request("long", [5] * 1025, None)
    with pytest.raises(SamplingParamsError, match="prompt is empty"):
        engine.add_request("empty", [], None)
    generate = LLMEngine(
        EngineConfig(model=str(tiny_checkpoint()), dtype="float32", device="cpu",
                     kv_cache_memory=64 * BLOCK_BYTES)
    )  # fmt: skip
    with pytest.raises(SamplingParamsError, match="needs a model served with --runner pooling"):
        generate.add_request("p", [5, 6], None)


def test_one_token_inputs_pool_through_the_decode_kernel_path(tiny_checkpoint, assert_pool_free):
    """A decode-shaped step (1 token a sequence) runs decode.c on packed weights: its hidden
    states pool as the torch path's do."""
    engine = pooling_engine(tiny_checkpoint, {"pooling_type": "CLS"}, quantization="int8")
    if engine.runner.fused is None:
        pytest.skip("no C compiler: decode.c is not built")
    reqs = {f"t{i}": [100 + 7 * i] for i in range(3)}
    fused = embed(engine, reqs)  # every step is decode-shaped
    torch_path = embed(engine, reqs | {"long": list(range(200, 230))})  # a prefill step
    for rid in reqs:
        diff = (torch.tensor(fused[rid]) - torch.tensor(torch_path[rid])).abs().max().item()
        assert diff < 1e-3, rid
    assert_pool_free(engine)


@pytest.fixture(scope="module")
def base_model_folder(tmp_path_factory, tiny_checkpoint, hf_base) -> str:
    """The tiny model saved as its base model (`LlamaModel`: no `model.` prefix, no head), as
    sentence-transformers saves a decoder."""
    import shutil

    out = tmp_path_factory.mktemp("tiny_base_model")
    hf_base.save_pretrained(out)
    for f in tiny_checkpoint().iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return str(out)


@pytest.mark.timeout(180)
def test_mean_pooling_under_tensor_parallelism_from_a_base_model_folder(
    base_model_folder, hf_base, assert_pool_free
):
    engine = LLMEngine(
        EngineConfig(
            model=base_model_folder,
            dtype="float32",
            device="cpu",
            runner="pooling",
            pooler_config={"pooling_type": "MEAN"},
            tensor_parallel_size=2,
            kv_cache_memory=64 * 4096,
            max_num_batched_tokens=16,
        )
    )
    try:
        reqs = prompts(3)
        got = embed(engine, reqs)
        for rid, ids in reqs.items():
            want = torch.nn.functional.normalize(hidden(hf_base, ids).mean(dim=0), dim=0)
            assert (torch.tensor(got[rid]) - want).abs().max().item() < 1e-4, rid
        assert_pool_free(engine)
    finally:
        engine.shutdown()
