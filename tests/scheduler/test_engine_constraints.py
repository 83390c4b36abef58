"""Constrained requests through LLMEngine: valid output, and the same tokens however scheduled."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from model.constraints import ConstraintError
from model.sampling_params import SamplingParams, StructuredOutputsParams
from scheduler.engine import LLMEngine
from tests.scheduler.test_engine import BLOCK_BYTES, make_engine, run, tokens  # noqa: F401

pytestmark = pytest.mark.timeout(120)

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "kind", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,4}"
CHOICES = ["alpha", "beta", "gamma delta"]
SPECS = [
    StructuredOutputsParams("json", json.dumps(SCHEMA)),
    StructuredOutputsParams("regex", REGEX),
    StructuredOutputsParams("choice", json.dumps(CHOICES)),
    StructuredOutputsParams("grammar", 'start: "(" NUM ("," NUM){0,3} ")"\nNUM: /[0-9]{1,3}/'),
]


def check(spec: StructuredOutputsParams, text: str) -> None:
    """The text satisfies the constraint."""
    if spec.kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif spec.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif spec.kind == "choice":
        assert text in CHOICES, text
    else:
        assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3}){0,3}\)", text), text


def workload() -> dict[str, tuple]:
    """8 constrained prompts sharing a 40-token prefix: greedy, seeded, an n=2; one free."""
    rng = random.Random(1)
    prefix = [rng.randrange(100, 40000) for _ in range(40)]
    reqs = {}
    for i, extra in enumerate([1, 3, 5, 8, 13, 17, 21, 26]):
        prompt = prefix + [rng.randrange(100, 40000) for _ in range(extra)]
        spec = SPECS[i % len(SPECS)] if i != 7 else None
        common = dict(max_tokens=48 if spec else 12, structured_outputs=spec, ignore_eos=not spec)
        if i % 2:
            params = SamplingParams(
                temperature=1.0, seed=200 + i, n=2 if i == 3 else 1, logprobs=2, **common
            )
        else:  # r4 also has penalties and a logit bias: they apply after the grammar's mask
            extra = dict(repetition_penalty=1.2, logit_bias={90: 5.0}) if i == 4 else {}
            params = SamplingParams(temperature=0.0, **common, **extra)
        reqs[f"r{i}"] = (prompt, params)
    return reqs


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    """Every request run alone on an engine without prefix caching."""
    from scheduler.config import EngineConfig

    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint()),
            dtype="float32",
            device="cpu",
            kv_cache_memory=256 * BLOCK_BYTES,
            enable_prefix_caching=False,
        )
    )
    out = {}
    for rid, req in workload().items():
        out.update(run(engine, {rid: req}))
    engine.shutdown()
    return out


def test_reference_outputs_are_valid(reference):
    reqs = workload()
    for rid, samples in reference.items():
        spec = reqs[rid][1].structured_outputs
        for s in samples.values():
            if spec is None:
                assert s.finish_reason == "length"
                continue
            # the grammar ends the sequence once it is complete (or EOS when it may end)
            assert s.finish_reason == "stop", (rid, s.text)
            check(spec, s.text)


@pytest.mark.parametrize("variant", ["together", "chunked", "prefix_hits", "preemption"])
def test_constrained_batch_invariance(variant, make_engine, reference, assert_pool_free):  # noqa: F811
    reqs = workload()
    if variant == "together":
        engine = make_engine()
        got = run(engine, reqs)
    elif variant == "chunked":
        engine = make_engine(max_num_batched_tokens=16)
        got = run(engine, reqs)
    elif variant == "prefix_hits":
        engine = make_engine()
        first = dict(list(reqs.items())[:1])
        got = run(engine, first) | run(engine, {k: v for k, v in reqs.items() if k not in first})
        assert engine.get_stats().prefix_cache_hits_total > 0
    else:
        engine = make_engine(kv_cache_memory=12 * BLOCK_BYTES, max_model_len=128)
        got = run(engine, reqs)
        assert engine.get_stats().num_preemptions_total > 0
    assert tokens(got) == tokens(reference)
    assert {r: [s.text for s in v.values()] for r, v in got.items()} == {
        r: [s.text for s in v.values()] for r, v in reference.items()
    }
    assert_pool_free(engine)
    engine.shutdown()


def test_every_mask_filled_gives_the_same_greedy_tokens(make_engine, reference):  # noqa: F811
    """The reference runs greedy requests alone, lazily (masks only where the model's pick breaks
    the grammar); with every mask filled (lazy off) they give the same tokens."""
    engine = make_engine()
    engine._constraint_compiler().lazy = False
    greedy = {k: v for k, v in workload().items() if k in ("r0", "r6")}  # JSON, grammar
    got = {}
    for rid, req in greedy.items():
        got.update(run(engine, {rid: req}))
    assert tokens(got) == {r: t for r, t in tokens(reference).items() if r in greedy}
    engine.shutdown()


def test_logprobs_are_the_raw_models(make_engine):  # noqa: F811
    """A forced token's logprob is its raw one (< 0), and its top-1 is the raw argmax."""
    engine = make_engine()
    spec = StructuredOutputsParams("choice", json.dumps(["zzzzqqq"]))
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=1, structured_outputs=spec)
    engine.add_request("c", [5, 6, 7], params)
    lps = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            lps += out.outputs[0].logprobs or []
    free = run(engine, {"f": ([5, 6, 7], SamplingParams(temperature=0, max_tokens=1))})
    first = lps[0]
    assert first.token_id != free["f"][0].token_ids[0]  # the grammar forced another token
    assert first.logprob < 0 and first.rank > 1
    assert first.top[0][0] == free["f"][0].token_ids[0]  # the raw model's best, masked or not
    engine.shutdown()


def test_invalid_constraints_raise_naming_the_field(make_engine):  # noqa: F811
    engine = make_engine()
    bad = [
        StructuredOutputsParams("regex", "[a-", "guided_regex"),
        StructuredOutputsParams("json", '{"type": "object", "properties": 5}', "response_format"),
        StructuredOutputsParams("grammar", "start: nothing_defined", "guided_grammar"),
    ]
    for spec in bad:
        with pytest.raises(ConstraintError) as e:
            engine.add_request("x", [5, 6], SamplingParams(structured_outputs=spec))
        assert e.value.param == spec.param
    assert not engine.has_unfinished_requests()
    engine.shutdown()
