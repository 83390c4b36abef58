"""Speculative decoding on the real engine: the output is the non-speculative one (greedy, seeded,
penalties, stops, grammars; alone, mixed, chunked, prefix hits, preemption) and blocks come back.

Most tests draft with an oracle (the reference continuation, its last draft token wrong every
other time): the tiny random model rarely repeats itself, and this exercises accepted prefixes,
rejections and block rollback on every step. The n-gram proposer itself runs on SmolLM2."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import scheduler.scheduler as scheduler_module
from model.sampling_params import SamplingParams, StructuredOutputsParams
from scheduler.spec_decode import (
    GATE_MIN_STEPS,
    GATE_PAUSE_STEPS,
    DraftState,
    SpecGate,
    SpeculativeConfig,
    propose_ngram,
)
from tests.scheduler.test_engine import BLOCK_BYTES, reference, run, tokens, workload  # noqa: F401

pytestmark = pytest.mark.timeout(120)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}


@pytest.fixture
def make_engine(tiny_checkpoint):
    """An engine on the tiny model; spec_max_rows raised so 8 streams all draft, no speed gate
    (a loaded test machine's timings must not change what is drafted)."""
    from scheduler.config import EngineConfig
    from scheduler.engine import LLMEngine

    def make(spec: dict | None = NGRAM, **kw) -> LLMEngine:
        cfg = dict(
            model=str(tiny_checkpoint()),
            dtype="float32",
            device="cpu",
            kv_cache_memory=256 * BLOCK_BYTES,
            speculative_config=spec,
        )
        engine = LLMEngine(EngineConfig(**(cfg | kw)))
        engine.scheduler.spec_max_rows = 64
        engine.scheduler.spec_gate = None
        return engine

    return make


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch):
    """oracle(refs, skip=()): draft each prompt's reference continuation (sample 0's), the last
    draft token wrong on every other proposal; prompts in `skip` never draft."""

    def install(refs: dict[tuple[int, ...], list[int]], skip: tuple = ()) -> list[int]:
        calls = [0]

        def propose(token_ids: list[int], k: int, lo: int, hi: int) -> list[int]:
            for prompt, out in refs.items():
                if tuple(token_ids[: len(prompt)]) == prompt:
                    if prompt in skip:
                        return []
                    calls[0] += 1
                    done = len(token_ids) - len(prompt)
                    draft = list(out[done : done + k])
                    if draft and calls[0] % 2:
                        draft[-1] = (draft[-1] + 1) % 49152
                    return draft
            return []

        monkeypatch.setattr(scheduler_module, "propose_ngram", propose)
        return calls

    return install


def refs_of(reqs: dict, ref: dict) -> dict[tuple[int, ...], list[int]]:
    return {tuple(prompt): ref[rid][0] for rid, (prompt, _) in reqs.items()}


def logprobs_of(engine, reqs: dict) -> dict[str, list]:
    """Each request's reported token logprobs, in order (sample 0)."""
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    out: dict[str, list] = {rid: [] for rid in reqs}
    while engine.has_unfinished_requests():
        for o in engine.step():
            for d in o.outputs:
                out[o.request_id] += d.logprobs or []
    return out


def check_spec(engine, min_accepted: int = 1) -> None:
    s = engine.get_stats()
    assert s.spec_decode_num_drafts_total > 0
    assert s.spec_decode_num_accepted_tokens_total >= min_accepted
    assert s.spec_decode_num_draft_tokens_total > s.spec_decode_num_accepted_tokens_total


def test_propose_ngram() -> None:
    ids = [1, 2, 3, 4, 9, 9, 1, 2, 3]
    assert propose_ngram(ids, 3, 1, 3) == [4, 9, 9]  # the longest suffix [1, 2, 3] recurs
    assert propose_ngram(ids, 3, 4, 5) == []  # no 4-token suffix recurs
    assert propose_ngram([5, 7, 5, 8, 5], 2, 1, 1) == [8, 5]  # the most recent occurrence
    assert propose_ngram([7, 7, 7], 4, 1, 2) == [7]  # continuation stops at the end
    assert propose_ngram([1 << 20, 1, 1 << 20], 1, 1, 1) == [1]  # token-aligned byte search
    assert propose_ngram([256, 1, 0, 0, 0], 1, 1, 1) == [0]  # not inside another token's bytes
    assert propose_ngram([3], 2, 1, 1) == []


def test_draft_state_adapts() -> None:
    s = DraftState(4)
    s.observe(4, 4, k_max=4)
    assert (s.k, s.skip) == (4, 0)
    s.observe(4, 1, k_max=4)
    assert (s.k, s.skip) == (2, 0)  # what was accepted + 1
    s.observe(2, 0, k_max=4)
    assert (s.k, s.skip, s.backoff) == (1, 1, 2)
    s.observe(1, 0, k_max=4)
    assert (s.k, s.skip, s.backoff) == (1, 2, 4)
    s.observe(1, 1, k_max=4)
    assert (s.k, s.backoff) == (2, 1)
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2}) == (
        SpeculativeConfig("ngram", 2, 5, 5)
    )


def test_spec_gate_pauses_drafting_that_does_not_pay() -> None:
    gate = SpecGate()
    for _ in range(GATE_MIN_STEPS):
        gate.observe(False, 1, 0.010)  # 100 tok/s without drafts
        gate.observe(True, 2, 0.015)  # 133 tok/s with: drafting pays
    assert gate.allows()
    for _ in range(GATE_MIN_STEPS):
        gate.observe(True, 1, 0.030)  # 33 tok/s: it no longer does
        if gate.pause:
            break
    assert gate.pause == GATE_PAUSE_STEPS and gate.num_spec == 0  # then measured afresh
    assert not any(gate.allows() for _ in range(GATE_PAUSE_STEPS))
    assert gate.allows()


@pytest.mark.parametrize(
    "variant", ["alone", "together", "mixed", "chunked", "prefix_hits", "preemption"]
)
def test_output_equals_non_speculative(variant, make_engine, oracle, assert_pool_free, request):
    """Greedy and seeded requests of test_engine's workload, spec on, against each run alone."""
    ref = request.getfixturevalue("reference")  # test_engine's, built once per module
    reqs = workload()
    skip = tuple(tuple(p) for rid, (p, _) in reqs.items() if rid in ("r1", "r4")) * (
        variant == "mixed"
    )
    oracle(refs_of(reqs, ref), skip)
    if variant == "alone":
        engine = make_engine()
        got = {}
        for rid, req in reqs.items():
            got |= tokens(run(engine, {rid: req}))
    elif variant in ("together", "mixed"):
        engine = make_engine()
        got = tokens(run(engine, reqs))
    elif variant == "chunked":
        engine = make_engine(max_num_batched_tokens=16)
        got = tokens(run(engine, reqs))
    elif variant == "prefix_hits":
        engine = make_engine()
        first = dict(list(reqs.items())[:1])
        got = tokens(run(engine, first)) | tokens(
            run(engine, {k: v for k, v in reqs.items() if k not in first})
        )
        assert engine.get_stats().prefix_cache_hits_total >= 8 * 32
    else:
        engine = make_engine(kv_cache_memory=12 * BLOCK_BYTES, max_model_len=128)
        got = tokens(run(engine, reqs))
        assert engine.get_stats().num_preemptions_total > 0
    assert got == ref
    check_spec(engine, min_accepted=8)
    assert_pool_free(engine)


def test_params_stops_and_logprobs_match(make_engine, oracle, assert_pool_free):
    """Penalties, logit_bias, min_tokens, top-k/p, min-p, logprobs, stop strings and tokens:
    every field of the output equals the non-speculative one."""
    prompt = list(range(300, 340))
    base = dict(max_tokens=24, ignore_eos=True, logprobs=2)
    cases = {
        "pen": SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3,
                              repetition_penalty=1.2, **base),
        "bias": SamplingParams(temperature=0.7, seed=3, top_k=40, top_p=0.9, min_p=0.05,
                               logit_bias={500: 3.0}, **base),
        "min": SamplingParams(temperature=0.0, min_tokens=6, **base),
    }  # fmt: skip
    reqs = {rid: (prompt + [i], p) for i, (rid, p) in enumerate(cases.items())}
    plain = make_engine(spec=None)
    ref = run(plain, reqs)
    # a stop string and a stop token inside what the oracle drafts
    stop_tok = ref["pen"][0].token_ids[9]
    text = ref["bias"][0].text
    stop_str = text[len(text) // 2 : len(text) // 2 + 3]
    reqs["stop_tok"] = (prompt + [7], SamplingParams(temperature=0.0, max_tokens=24,
                                                     stop_token_ids=[stop_tok]))  # fmt: skip
    reqs["stop_str"] = (prompt + [1], replace(cases["bias"], stop=[stop_str]))  # as "bias"
    ref = run(plain, reqs)
    oracle({tuple(p): ref[rid][0].token_ids for rid, (p, _) in reqs.items()})
    engine = make_engine()
    lps_ref, lps = logprobs_of(plain, reqs), logprobs_of(engine, reqs)
    got = run(engine, reqs)
    assert got == ref
    assert got["stop_str"][0].finish_reason == "stop"
    for rid, want in lps_ref.items():  # the target's logprobs, up to float32 batch rounding
        assert [(x.token_id, x.rank, [t for t, _ in x.top]) for x in lps[rid]] == [
            (x.token_id, x.rank, [t for t, _ in x.top]) for x in want
        ]
        assert [x.logprob for x in lps[rid]] == pytest.approx([x.logprob for x in want], abs=1e-4)
    check_spec(engine)
    assert_pool_free(plain)
    assert_pool_free(engine)


def test_grammar_constrained_drafts(make_engine, oracle, assert_pool_free):
    """A constrained sequence drafts only what its grammar takes, its draft rows are masked in
    the grammar state after the draft tokens before them, and its mask rows stay aligned with
    the step's rows beside speculating sequences: the output equals the non-speculative one."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["name", "tags"]}  # fmt: skip
    json_spec = StructuredOutputsParams("json", json.dumps(schema))
    choice = StructuredOutputsParams("choice", json.dumps(["alpha beta gamma", "delta"]))
    greedy = dict(temperature=0.0, max_tokens=40)
    reqs = {
        "a": ([400 + i for i in range(20)], SamplingParams(**greedy, ignore_eos=True)),
        "j": ([500 + i for i in range(20)], SamplingParams(**greedy, structured_outputs=json_spec)),
        "c": ([550 + i for i in range(20)], SamplingParams(**greedy, structured_outputs=choice)),
        "s": ([600 + i for i in range(20)], SamplingParams(temperature=0.8, seed=5, max_tokens=40,
                                                          structured_outputs=json_spec)),
    }  # fmt: skip
    plain = make_engine(spec=None)
    ref = run(plain, reqs)
    calls = oracle({tuple(p): ref[rid][0].token_ids for rid, (p, _) in reqs.items()})
    engine = make_engine()
    got = run(engine, reqs)
    assert got == ref and got["c"][0].text in ("alpha beta gamma", "delta")
    assert got["j"][0].text.startswith('{"name":"') and got["s"][0].text.startswith('{"name":"')
    check_spec(engine, min_accepted=10)
    assert calls[0] > 10
    m, tok = engine.constraints.matcher(json_spec), engine.tokenizer
    good, bad = tok.encode('{"', False), tok.encode("]]", False)
    assert m.valid_prefix(good + bad + good) == len(good)
    assert m.valid_prefix([tok.eos_token_ids[0], *good]) == 0  # EOS: not a draft token
    assert (m.advanced(good[0]).num_tokens, m.num_tokens) == (1, 0)
    assert_pool_free(engine)


def test_metrics_and_request_timings(make_engine, oracle, assert_pool_free):
    prompt = list(range(700, 730))
    reqs = {"r": (prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))}
    ref = run(make_engine(spec=None), reqs)
    oracle({tuple(prompt): ref["r"][0].token_ids})
    engine = make_engine()
    metrics = []
    engine.add_request("r", prompt, reqs["r"][1])
    lengths = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            metrics.append(out.metrics)
        lengths += engine.get_stats().step_acceptance_lengths
    s = engine.get_stats()
    m = metrics[-1]
    assert m.num_draft_tokens == s.spec_decode_num_draft_tokens_total > 0
    assert m.num_accepted_tokens == s.spec_decode_num_accepted_tokens_total > 0
    assert len(lengths) == s.spec_decode_num_drafts_total
    assert sum(lengths) == s.spec_decode_num_drafts_total + s.spec_decode_num_accepted_tokens_total
    assert engine.num_steps < 30  # several tokens a step
    assert_pool_free(engine)


@pytest.mark.timeout(300)
def test_ngram_on_smollm2_is_exact_and_accepts(smollm2_gguf, assert_pool_free):
    """The prompt-lookup proposer on the default model: a grounded prompt (copy a passage) gets
    most tokens accepted; greedy output equals the non-speculative one."""
    from scheduler.config import EngineConfig
    from scheduler.engine import LLMEngine

    passage = (
        "The quick brown fox jumps over the lazy dog. The dog sleeps under the old oak tree, "
        "and the fox runs into the forest to find its family before the sun goes down."
    )
    prompt = (
        f"<|im_start|>user\nRepeat this text exactly: {passage}<|im_end|>\n<|im_start|>assistant\n"  # noqa: E501
    )
    params = SamplingParams(temperature=0.0, max_tokens=40)
    outs = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4,
                        "prompt_lookup_min": 2, "prompt_lookup_max": 4}):  # fmt: skip
        engine = LLMEngine(EngineConfig(speculative_config=spec, kv_cache_memory="64MiB",
                                        max_model_len=512))  # fmt: skip
        engine.scheduler.spec_gate = None
        outs.append((tokens(run(engine, {"r": (prompt, params)})), engine.num_steps))
        assert_pool_free(engine)
    (ref, ref_steps), (got, steps) = outs
    assert got == ref
    s = engine.get_stats()
    assert s.spec_decode_num_accepted_tokens_total >= 10, s
    assert steps < ref_steps


@pytest.mark.timeout(300)
def test_tensor_parallel_verification(make_engine, oracle, tiny_checkpoint, assert_pool_free):
    """Every rank runs the 1 + k rows (num_sampled travels in the step's wire form) and joins
    the logits gather of all of them; rank 0 samples. Greedy, against the same TP without."""
    reqs = {
        f"r{i}": ([300 + 7 * i + j for j in range(24)],
                  SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        for i in range(3)
    }  # fmt: skip
    outs = []
    itself = {"method": "draft_model", "model": str(tiny_checkpoint()), "num_speculative_tokens": 3}
    for spec in (None, NGRAM, itself):  # the draft model runs on rank 0 alone
        engine = make_engine(spec=spec, tensor_parallel_size=2, kv_cache_memory=64 * 4096)
        try:
            outs.append(tokens(run(engine, reqs)))
            s = engine.get_stats()
            if spec is None:
                oracle({tuple(p): outs[0][rid][0] for rid, (p, _) in reqs.items()})
            elif spec is NGRAM:
                check_spec(engine)
            else:  # greedy drafts of the same model: all accepted
                drafted = s.spec_decode_num_draft_tokens_total
                assert s.spec_decode_num_accepted_tokens_total == drafted > 0
            assert_pool_free(engine)
        finally:
            engine.shutdown()
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("draft", ["itself", "another"])
def test_draft_model(draft, make_engine, tiny_checkpoint, assert_pool_free):
    """vLLM's draft_model method: the model drafting for itself is (nearly) always accepted,
    another model rarely; either way the output is the non-speculative one."""
    path = str(tiny_checkpoint("llama" if draft == "itself" else "qwen2"))
    reqs = {
        "g": ([300 + 7 * j for j in range(30)],
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
        "s": ([900 + 3 * j for j in range(20)],
              SamplingParams(temperature=0.8, seed=11, top_k=20, max_tokens=24, ignore_eos=True)),
        "hit": ([300 + 7 * j for j in range(30)] + [5, 6],  # "g"'s first block from cache
                SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)),
    }  # fmt: skip
    ref = tokens(run(make_engine(spec=None), reqs))
    spec = {"method": "draft_model", "model": path, "num_speculative_tokens": 3}
    engine = make_engine(spec=spec, max_num_batched_tokens=16)  # chunked prompts: both caches
    got = tokens(run(engine, {"g": reqs["g"]}))
    s = engine.get_stats()
    assert s.spec_decode_num_drafts_total > 0
    if draft == "itself":  # greedy drafts of the same model: all accepted
        assert s.spec_decode_num_accepted_tokens_total == s.spec_decode_num_draft_tokens_total
    got |= tokens(run(engine, {"s": reqs["s"]}))
    before = engine.get_stats()
    got |= tokens(run(engine, {"hit": reqs["hit"]}))
    s = engine.get_stats()
    assert s.prefix_cache_hits_total - before.prefix_cache_hits_total == 16
    if draft == "itself":  # the cached blocks hold the draft's K/V too
        drafted = s.spec_decode_num_draft_tokens_total - before.spec_decode_num_draft_tokens_total
        accepted = s.spec_decode_num_accepted_tokens_total
        assert accepted - before.spec_decode_num_accepted_tokens_total == drafted > 0
    assert got == ref
    assert_pool_free(engine)
    with pytest.raises(ValueError, match="draft_model needs a model path"):
        SpeculativeConfig.from_dict({"method": "draft_model", "num_speculative_tokens": 2})
