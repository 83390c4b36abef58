"""LLMEngine on a tiny model: batch invariance (chunks, prefix hits, preemption), stops, abort."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.errors import PromptTooLongError
from scheduler.llm import LLM

pytestmark = pytest.mark.timeout(60)

BLOCK_BYTES = (
    8192  # tiny model, float32: 2 layers x (K + V) x 2 kv heads x 16 dims x 4 B x 16 tokens
)


@dataclass
class Sample:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@pytest.fixture
def make_engine(tiny_checkpoint):
    def make(**kw) -> LLMEngine:
        cfg = dict(
            model=str(tiny_checkpoint()),
            dtype="float32",
            device="cpu",
            kv_cache_memory=256 * BLOCK_BYTES,
        )
        return LLMEngine(EngineConfig(**(cfg | kw)))

    return make


def drain(engine: LLMEngine) -> dict[str, dict[int, Sample]]:
    """Step until idle; join each request's deltas; exactly one finished output per request."""
    acc: dict[str, dict[int, Sample]] = {}
    done: set[str] = set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in done, f"{out.request_id} reported after finishing"
            for d in out.outputs:
                s = acc.setdefault(out.request_id, {}).setdefault(d.index, Sample())
                assert s.finish_reason is None
                s.token_ids += d.token_ids
                s.text += d.text
                s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
                assert d.num_tokens == len(s.token_ids)
            if out.finished:
                done.add(out.request_id)
                assert all(s.finish_reason for s in acc[out.request_id].values())
    return acc


def run(engine: LLMEngine, reqs: dict[str, tuple]) -> dict[str, dict[int, Sample]]:
    for rid, (prompt, params) in reqs.items():
        engine.add_request(rid, prompt, params)
    return drain(engine)


def tokens(result: dict[str, dict[int, Sample]]) -> dict[str, list[list[int]]]:
    return {rid: [s.token_ids for _, s in sorted(r.items())] for rid, r in result.items()}


def workload() -> dict[str, tuple]:
    """8 prompts sharing a 40-token prefix, different lengths; greedy, seeded, and an n=2."""
    rng = random.Random(0)
    prefix = [rng.randrange(100, 40000) for _ in range(40)]
    reqs = {}
    for i, extra in enumerate([1, 3, 5, 8, 13, 17, 21, 26]):
        prompt = prefix + [rng.randrange(100, 40000) for _ in range(extra)]
        if i % 2:
            params = SamplingParams(
                temperature=0.9, seed=100 + i, max_tokens=12, ignore_eos=True, n=2 if i == 3 else 1
            )
        else:
            params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        reqs[f"r{i}"] = (prompt, params)
    return reqs


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Every request of the workload run alone, prefix caching off."""
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint()),
            dtype="float32",
            device="cpu",
            kv_cache_memory=256 * BLOCK_BYTES,
            enable_prefix_caching=False,
        )
    )
    ref = {}
    for rid, req in workload().items():
        ref.update(tokens(run(engine, {rid: req})))
    return ref


@pytest.mark.parametrize("variant", ["together", "chunked", "prefix_hits", "preemption"])
def test_batch_invariance(variant, make_engine, reference, assert_pool_free):
    reqs = workload()
    if variant == "together":
        engine = make_engine()
        got = run(engine, reqs)
    elif variant == "chunked":
        engine = make_engine(max_num_batched_tokens=16)
        got = run(engine, reqs)
        assert engine.get_stats().step_num_tokens <= 16
    elif variant == "prefix_hits":
        engine = make_engine()
        first = dict(list(reqs.items())[:1])
        got = run(engine, first) | run(engine, {k: v for k, v in reqs.items() if k not in first})
        # 7 later prompts (8 sequences) each reuse the 2 full blocks of the shared 40-token prefix
        assert engine.get_stats().prefix_cache_hits_total >= 8 * 32
    else:
        engine = make_engine(kv_cache_memory=12 * BLOCK_BYTES, max_model_len=128)
        assert engine.block_manager.num_total_blocks == 12
        got = run(engine, reqs)
        assert engine.get_stats().num_preemptions_total > 0
    assert tokens(got) == reference
    assert all(s.finish_reason == "length" for r in got.values() for s in r.values())
    assert_pool_free(engine)


def test_n_samples_share_prompt_blocks(make_engine, assert_pool_free):
    engine = make_engine()
    prompt = list(range(1000, 1040))
    engine.add_request("n3", prompt, SamplingParams(temperature=0.0, max_tokens=6, n=3))
    seqs = engine.requests.get("n3") or engine._new[0]
    seqs = seqs.seqs
    shared = False
    acc: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for d in out.outputs:
                acc[d.index] += d.token_ids
        if all(s.status == s.status.RUNNING for s in seqs):
            table = seqs[0].block_table
            assert [engine.block_manager.blocks[b].ref_count for b in table[:2]] == [3, 3]
            assert all(s.block_table[:2] == table[:2] for s in seqs)
            shared = True
    assert shared
    assert acc[0] == acc[1] == acc[2] and len(acc[0]) == 6
    assert engine.get_stats().prefix_cache_hits_total == 2 * 32
    assert_pool_free(engine)


def test_stop_strings_across_token_boundaries(make_engine, assert_pool_free):
    engine = make_engine()
    prompt = list(range(2000, 2010))
    greedy = dict(temperature=0.0, max_tokens=10, ignore_eos=True)
    engine.add_request("ref", prompt, SamplingParams(**greedy))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    full = "".join(texts)
    k = next(
        i
        for i in range(1, len(texts))
        if len(texts[i - 1]) >= 2
        and len(texts[i]) >= 2
        and full.find(texts[i - 1][-2:] + texts[i][:2]) == len("".join(texts[:i])) - 2
    )
    stop = texts[k - 1][-2:] + texts[k][:2]
    cut = len("".join(texts[:k])) - 2
    got = run(
        engine,
        {
            "cut": (prompt, SamplingParams(**greedy, stop=[stop, "\x00never"])),
            "keep": (
                prompt,
                SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=True),
            ),
        },
    )
    cut_s, keep_s = got["cut"][0], got["keep"][0]
    assert (cut_s.text, cut_s.finish_reason, cut_s.stop_reason) == (full[:cut], "stop", stop)
    assert keep_s.text == full[: cut + 4]
    assert len(cut_s.token_ids) == k + 1  # the token that completed the stop string is kept
    assert_pool_free(engine)


def test_stop_token_ids_eos_min_tokens_ignore_eos_max_tokens(make_engine, assert_pool_free):
    engine = make_engine()
    eos = engine.tokenizer.eos_token_ids[0]
    prompt = list(range(3000, 3012))
    ref = run(engine, {"ref": (prompt, SamplingParams(temperature=0.0, max_tokens=8))})
    ref_ids = ref["ref"][0].token_ids
    assert ref["ref"][0].finish_reason == "length" and len(ref_ids) == 8
    i = next(i for i in range(2, 8) if ref_ids[i] not in ref_ids[:i])
    force_eos = dict(temperature=0.0, max_tokens=6, logit_bias={eos: 100.0})
    got = run(
        engine,
        {
            "stop_id": (
                prompt,
                SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[ref_ids[i]]),
            ),
            "eos": (prompt, SamplingParams(**force_eos)),
            "ignore_eos": (prompt, SamplingParams(**force_eos, ignore_eos=True)),
            "min_tokens": (prompt, SamplingParams(**force_eos, min_tokens=3)),
            "min_stop_id": (
                prompt,
                SamplingParams(
                    temperature=0.0, max_tokens=8, min_tokens=2, stop_token_ids=[ref_ids[0]]
                ),
            ),
        },
    )
    s = got["stop_id"][0]
    assert (s.token_ids, s.finish_reason, s.stop_reason) == (ref_ids[: i + 1], "stop", ref_ids[i])
    assert (got["eos"][0].token_ids, got["eos"][0].finish_reason) == ([eos], "stop")
    assert got["eos"][0].stop_reason is None and got["eos"][0].text == ""
    assert (got["ignore_eos"][0].token_ids, got["ignore_eos"][0].finish_reason) == (
        [eos] * 6,
        "length",
    )
    m = got["min_tokens"][0]
    assert eos not in m.token_ids[:3] and m.token_ids[3:] == [eos] and m.finish_reason == "stop"
    assert ref_ids[0] not in got["min_stop_id"][0].token_ids[:2]
    assert_pool_free(engine)


def test_abort_frees_blocks_and_reports(make_engine, assert_pool_free):
    engine = make_engine()
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", list(range(100, 140)), params)
    engine.add_request("b", list(range(200, 220)), params)
    engine.add_request("w", list(range(300, 310)), params)
    engine.abort_request("w")  # aborted before it ever ran
    engine.step()
    engine.step()
    used = engine.block_manager.num_total_blocks - engine.block_manager.num_free_blocks
    assert used == 3 + 2
    engine.abort_request("a")
    engine.abort_request("nope")  # unknown ids are ignored
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a"].finished and outs["a"].outputs[0].finish_reason == "abort"
    assert not outs["b"].finished
    assert engine.block_manager.num_total_blocks - engine.block_manager.num_free_blocks == 2
    engine.block_manager.check_integrity(engine.scheduler.running)
    finals = {}
    while engine.has_unfinished_requests():
        finals |= {o.request_id: o.outputs[0].finish_reason for o in engine.step() if o.finished}
    assert finals == {"b": "length"}
    assert_pool_free(engine)


def test_validation_errors(make_engine, assert_pool_free):
    engine = make_engine(max_model_len=64)
    with pytest.raises(
        PromptTooLongError,
        match=r"prompt has 60 tokens \+ max_tokens 10 > "
        r"max_model_len 64",
    ):
        engine.add_request("x", [5] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(PromptTooLongError, match="prompt has 64 tokens"):
        engine.add_request("x", [5] * 64, SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match=r"token id 49152 is out of vocabulary \[0, 49152\)"):
        engine.add_request("x", [1, 49152], SamplingParams())
    engine.add_request(
        "fill", [5] * 60, SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    )
    with pytest.raises(ValueError, match="already running"):
        engine.add_request("fill", [5], SamplingParams())
    got = drain(engine)
    assert len(got["fill"][0].token_ids) == 4 and got["fill"][0].finish_reason == "length"
    assert_pool_free(engine)


def test_logprobs_stats_and_text_prompt(make_engine, assert_pool_free):
    engine = make_engine()
    assert engine.model_name == engine.config.model.rstrip("/").split("/")[-1]
    engine.add_request(
        "t", "Hello there, how are", SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)
    )
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[0].prompt_token_ids == engine.tokenizer.encode("Hello there, how are")
    for o in outs:
        (lp,) = o.outputs[0].logprobs
        assert lp.token_id == o.outputs[0].token_ids[0] and lp.rank == 1 and len(lp.top) == 2
    stats = engine.get_stats()
    assert set(stats.step_time_split) == {
        "schedule",
        "execute",
        "update",
        "detokenize",
        "prepare",
        "forward",
        "sample",
    }
    assert stats.step_num_seqs == 1 and stats.step_num_tokens == 1
    assert outs[-1].metrics.first_token_time <= outs[-1].metrics.finished_time
    assert_pool_free(engine)


def test_offline_llm_generate(tiny_checkpoint):
    llm = LLM(
        str(tiny_checkpoint()), dtype="float32", device="cpu", kv_cache_memory=64 * BLOCK_BYTES
    )
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    (single,) = llm.generate([7, 8, 9], params)
    both = llm.generate(
        ["Hello world", [7, 8, 9]],
        [params, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=2)],
    )
    assert single.prompt_token_ids == [7, 8, 9]
    assert (
        both[1].outputs[0].token_ids == both[1].outputs[1].token_ids == single.outputs[0].token_ids
    )
    for r in both:
        for o in r.outputs:
            assert len(o.token_ids) == 5 and o.finish_reason == "length"
            assert o.text == llm.tokenizer.decode(o.token_ids)
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        llm.generate(["a", "b"], [params])
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_total_blocks
    # --max-num-seqs and --max-num-batched-tokens unset: the CPU defaults the scheduler keeps to
    assert llm.engine.max_num_seqs == llm.engine.scheduler.max_num_seqs == 32
    assert llm.engine.max_num_batched_tokens == llm.engine.scheduler.max_num_batched_tokens == 1024


def test_token_counters_and_inter_token_gaps_move_every_step(make_engine, assert_pool_free):
    """vLLM's counting: prompt tokens at a request's first token, generated ones every step,
    one inter-token gap per request per step after its first token (n samples share it)."""
    engine = make_engine()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", [5] * 20, params)
    engine.add_request("b", [6] * 7, SamplingParams(temperature=0.8, max_tokens=4, ignore_eos=True,
                                                    n=2, seed=1))  # fmt: skip
    seen = []
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.get_stats()
        seen.append((s.prompt_tokens_total, s.generation_tokens_total,
                     len(s.step_inter_token_latencies), s.num_steps_total))  # fmt: skip
    assert seen[0] == (27, 3, 0, 1)  # both prefills in one step: 1 + 2 first tokens, no gaps
    assert seen[1] == (27, 6, 2, 2)  # one gap for "a", one for "b" (its 2 samples together)
    assert seen[-1][:3] == (27, 12, 2) and seen[-1][3] == len(seen) == 4
    assert all(0 <= g < 60 for g in engine.get_stats().step_inter_token_latencies)
    assert_pool_free(engine)


def test_generation_config_defaults(make_engine, caplog):
    engine = make_engine(generation_config="vllm",
                         override_generation_config={"max_new_tokens": 3, "top_k": 5})  # fmt: skip
    assert engine.default_sampling_params == {"top_k": 5, "max_tokens": 3}
    assert "default sampling parameters" in caplog.text and "'top_k': 5" in caplog.text
    assert make_engine().default_sampling_params == {}  # the tiny checkpoint sets no sampling
    with pytest.raises(ValueError, match="generation config defaults .* are invalid: top_p"):
        make_engine(generation_config="vllm", override_generation_config={"top_p": 0.0})
    llm = LLM(engine.config.model, dtype="float32", device="cpu",
              kv_cache_memory=64 * BLOCK_BYTES, generation_config="vllm",
              override_generation_config={"max_new_tokens": 2, "temperature": 0.0})  # fmt: skip
    assert llm.get_default_sampling_params() == SamplingParams(max_tokens=2, temperature=0.0)
