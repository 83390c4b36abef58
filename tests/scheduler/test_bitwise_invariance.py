"""One request's logprobs are the same floats alone, on a prefix-cache hit, among 15 others and
with --max-num-batched-tokens 64, on both activation paths of the default GGUF (decode.c serves
every step: each row's arithmetic depends on that row alone)."""

from __future__ import annotations

import pytest

from model.sampling_params import SamplingParams
from scheduler.llm import LLM

pytestmark = pytest.mark.timeout(600)

TARGET = (
    "Write a short poem about the sea and the wind, in four lines, and then explain in one "
    "sentence which image in it you like best and why."
)
OTHERS = [
    f"Tell me fact number {i} about the history of mathematics and its long story." * (1 + i % 3)
    for i in range(15)
]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


def chosen_logprobs(llm: LLM, prompts: list[str], index: int) -> list[float]:
    out = llm.generate(prompts, PARAMS)[index]
    return [lp.logprob for lp in out.outputs[0].logprobs]


@pytest.mark.parametrize("activation_dtype", ["float32", "int8"])
def test_logprobs_are_the_same_floats_in_any_batch(smollm2_gguf, activation_dtype) -> None:
    kw = {"activation_dtype": activation_dtype, "kv_cache_memory": "128MiB"}
    llm = LLM(smollm2_gguf, **kw)
    assert llm.engine.runner.fused is not None, "decode.c serves the default GGUF"
    alone = chosen_logprobs(llm, [TARGET], 0)
    assert chosen_logprobs(llm, [TARGET], 0) == alone  # the prompt's blocks come from the cache
    assert llm.engine.get_stats().prefix_cache_hits_total > 0
    llm.shutdown()
    for extra in ({}, {"max_num_batched_tokens": 64}):
        llm = LLM(smollm2_gguf, **kw, **extra)
        together = chosen_logprobs(llm, OTHERS[:7] + [TARGET] + OTHERS[7:], 7)
        assert together == alone, f"{extra or 'default budget'}: {together} != {alone}"
        if extra:
            assert llm.engine.get_stats().step_num_tokens <= 64
        llm.shutdown()
