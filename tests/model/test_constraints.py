"""Grammar matchers and masks on SmolLM2's tokenizer: EOS only when complete, masks before all."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from model.constraints import ConstraintCompiler, ConstraintError, _eos_bits, grammar_of
from model.inputs import SamplingRow
from model.sampler import Sampler
from model.sampling_params import StructuredOutputsParams
from model.tokenizer import load_tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def compiler(tok):
    c = ConstraintCompiler(tok.hf, 49152, tok.eos_token_ids)
    yield c
    c.shutdown()


def _allowed(compiler, matchers) -> torch.Tensor:
    batch = compiler.batch(matchers)
    return batch.allowed(49152, torch.device("cpu"))


def test_choice_walk_eos_only_at_the_end(compiler, tok):
    spec = StructuredOutputsParams("choice", json.dumps(["yes", "no"]))
    m = compiler.matcher(spec)
    (allowed,) = _allowed(compiler, [m])
    eos = tok.eos_token_ids[0]
    assert not allowed[eos]  # nothing written yet: EOS forbidden
    ids = tok.encode("yes", add_special_tokens=False)
    assert allowed[ids[0]] and int(allowed.sum()) < 100
    for t in ids:
        assert m.accept(t)
    assert m.is_finished  # complete: the scheduler ends the sequence here
    (allowed,) = _allowed(compiler, [m])
    assert allowed[eos] and int(allowed.sum()) == len(set(tok.eos_token_ids))


def test_gbnf_grammar_is_converted(compiler, tok):
    """llama.cpp's GBNF (`::=`) goes through llguidance's converter: only its strings pass."""
    spec = StructuredOutputsParams("grammar", 'root ::= "yes" | "no"')
    m = compiler.matcher(spec)
    for t in tok.encode("no", add_special_tokens=False):
        assert m.accept(t)
    assert m.is_finished
    m = compiler.matcher(spec)
    assert not all(m.accept(t) for t in tok.encode("maybe", add_special_tokens=False))


def test_batch_of_rows_and_unconstrained_rows(compiler, tok):
    """Rows without a matcher are untouched; a batch of none is None (pays nothing)."""
    assert compiler.batch([None, None]) is None
    regex = compiler.matcher(StructuredOutputsParams("regex", "[0-9]+"))
    batch = compiler.batch([None, regex])
    assert batch.rows == [1]
    logits = torch.zeros(2, 49152)
    masked = batch.apply(logits)
    assert torch.equal(masked[0], logits[0])
    digits = tok.encode("7", add_special_tokens=False)[0]
    letter = tok.encode("a", add_special_tokens=False)[0]
    assert masked[1, digits] == 0 and masked[1, letter] == float("-inf")
    assert bool(torch.isinf(logits).any()) is False  # the raw logits stay raw


def test_sampler_masks_first_and_logprobs_stay_raw(compiler, tok):
    m = compiler.matcher(StructuredOutputsParams("choice", json.dumps(["no"])))
    no = tok.encode("no", add_special_tokens=False)[0]
    logits = torch.zeros(1, 49152)
    logits[0, 5] = 10.0  # the raw argmax is not allowed
    rows = [SamplingRow(temperature=0.0, num_logprobs=1, logit_bias={no: -50.0})]
    out = Sampler(0)(logits, rows, compiler.batch([m]))
    assert out.token_ids == [no]  # even a -50 bias cannot push out the only allowed token
    lp = out.logprobs[0]
    assert lp.top[0][0] == 5 and lp.rank > 1
    assert lp.logprob == pytest.approx(float(logits.log_softmax(-1)[0, no]))
    sampled = Sampler(0)(logits, [SamplingRow(temperature=1.0, seed=3)], compiler.batch([m]))
    assert sampled.token_ids == [no]


def test_errors_name_the_field(compiler):
    with pytest.raises(ConstraintError, match="uniqueItems") as e:
        compiler.compile(
            StructuredOutputsParams("json", '{"type":"array","uniqueItems":true}', "guided_json")
        )
    assert e.value.param == "guided_json"
    with pytest.raises(ConstraintError, match="regular expression"):
        compiler.compile(StructuredOutputsParams("regex", "(", "guided_regex"))
    with pytest.raises(ConstraintError, match="not valid JSON"):
        compiler.compile(StructuredOutputsParams("json", "{", "guided_json"))


def test_cache_is_an_lru_bounded_by_bytes(tok):
    specs = [StructuredOutputsParams("regex", f"a{{{i}}}") for i in range(1, 5)]
    size = len(specs[0].spec) + len(grammar_of(specs[0]))  # the same for each
    c = ConstraintCompiler(tok.hf, 49152, tok.eos_token_ids, cache_bytes=2 * size + 1)
    try:
        for s in specs:
            c.compile(s)
        assert list(c._cache) == specs[-2:] and c.cached_bytes == 2 * size
        assert c.compile(specs[2]) is c.compile(specs[2])  # a hit is the same object
        assert list(c._cache) == [specs[3], specs[2]]  # and the most recent
        big = StructuredOutputsParams("regex", "b" * (2 * size))  # more than the whole cache
        assert c.compile(big) is not None
        assert list(c._cache) == [specs[3], specs[2]] and c.cached_bytes == 2 * size
        wide = StructuredOutputsParams("regex", "c" * (size - len(grammar_of(specs[0])) + 3))
        c.compile(wide)  # a bit more than one small entry: displaces both
        assert list(c._cache) == [wide] and c.cached_bytes == len(wide.spec) + len(grammar_of(wide))
    finally:
        c.shutdown()


def test_compile_async_runs_on_the_compile_thread(tok):
    c = ConstraintCompiler(tok.hf, 49152, tok.eos_token_ids)
    spec = StructuredOutputsParams("regex", "[0-9]{3}")
    threads = []
    real = c.compile

    def spy(s):
        threads.append(threading.current_thread().name)
        return real(s)

    c.compile = spy
    future = c.compile_async(spec)
    template = future.result(30)
    assert threads == ["tokenmill-grammar_0"]
    hit = c.compile_async(spec)
    assert hit.done() and hit.result() is template and threads == ["tokenmill-grammar_0"]
    bad = c.compile_async(StructuredOutputsParams("regex", "(", "guided_regex"))
    with pytest.raises(ConstraintError, match="regular expression"):
        bad.result(30)
    c.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        c.compile_async(StructuredOutputsParams("regex", "x"))


@pytest.mark.parametrize("during_forward", [False, True])
def test_prefetched_masks_are_reused_only_where_they_are_current(compiler, tok, during_forward):
    """prefetch fills the next step's rows after accept; batch reuses them (in any order), fills
    rows that joined or moved since, and always gives the masks a fresh fill would."""
    compiler.fill_during_forward = during_forward
    digits = StructuredOutputsParams("regex", "[0-9]{2}")
    a, b, c = (compiler.matcher(digits) for _ in range(3))
    one = tok.encode("1", add_special_tokens=False)[0]

    def fresh(ms):  # what a synchronous fill gives, as the reference
        compiler.overlap = False
        try:
            return compiler.batch(ms).bitmask.clone()
        finally:
            compiler.overlap = True

    assert a.accept(one)
    compiler.prefetch([a, b, None])
    batch = compiler.batch([b, None, a])  # another order: rows come from the prefetch
    assert batch.where == [(0, 1), (0, 0)] and len(batch.fills) == 1
    assert torch.equal(batch.bitmask, fresh([b, a]))
    compiler.prefetch([a, b])
    compiler._next.wait()
    assert b.accept(one)  # b moved after the prefetch, c joins: both filled anew, a reused
    batch = compiler.batch([a, b, c])
    assert batch.where == [(0, 0), (1, 0), (1, 1)]
    assert torch.equal(batch.bitmask, fresh([a, b, c]))
    assert batch.fill_time > 0 and batch.wait_time >= 0
    compiler.prefetch([a])
    assert compiler.batch([None]) is None and compiler._next is None  # nothing left running
    compiler.fill_during_forward = False


def test_greedy_rows_take_the_masked_argmax_with_raw_logprobs(compiler, tok):
    """All-greedy rows skip the masked copy; tokens match masking then argmax, logprobs stay raw."""
    digits = StructuredOutputsParams("regex", "[0-9]+")
    a, b = compiler.matcher(digits), compiler.matcher(digits)
    seven = tok.encode("7", add_special_tokens=False)[0]
    assert b.accept(seven)
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
    batch = compiler.batch([a, None, b])
    rows = [SamplingRow(temperature=0.0, num_logprobs=1) for _ in range(3)]
    out = Sampler(0)(logits, rows, batch)
    masked = logits.clone()
    masked[[0, 2]] = logits[[0, 2]].masked_fill(~batch.allowed(49152, logits.device), -1e30)
    assert out.token_ids == masked.argmax(dim=-1).tolist()
    assert out.token_ids[1] == int(logits[1].argmax())  # the free row is untouched
    assert out.token_ids[0] != int(logits[0].argmax())  # the grammar changed the pick
    raw = logits.log_softmax(-1)
    for i, lp in enumerate(out.logprobs):
        assert lp.logprob == pytest.approx(float(raw[i, out.token_ids[i]]))


def test_eos_bits_group_ids_by_word_and_keep_bit_31():
    words, bits = _eos_bits([2, 0, 63, 95, 2, 40])
    assert words.tolist() == [0, 1, 2]
    assert bits.tolist() == [0b101, -(2**31) | (1 << 8), -(2**31)]
    mask = np.zeros((2, 3), dtype=np.int32)
    mask[np.ix_([1], words)] |= bits
    allowed = np.nonzero(np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[1])[0]
    assert allowed.tolist() == [0, 2, 40, 63, 95]


def test_allows_agrees_with_the_filled_mask(compiler, tok):
    """The lazy check (validate one token) and the mask say the same, EOS included, along a
    JSON walk: allowed tokens, random ones, EOS and the next token at every position."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}}
    m = compiler.matcher(StructuredOutputsParams("json", json.dumps(schema)))
    text = '{"a":"xyz"}'
    gen = np.random.default_rng(0)
    for t in tok.encode(text, add_special_tokens=False) + [None]:
        (allowed,) = _allowed(compiler, [m])
        on = np.nonzero(allowed.numpy())[0]
        probe = {*on[:: max(1, len(on) // 200)].tolist(), *gen.integers(0, 49152, 200).tolist()}
        probe |= set(tok.eos_token_ids) | ({t} if t is not None else set())
        assert {p for p in probe if m.allows(p)} == {p for p in probe if allowed[p]}
        if t is not None:
            assert m.accept(t)
    assert m.allows(tok.eos_token_ids[0]) and m.is_finished


def test_lazy_greedy_rows_fill_only_where_the_pick_breaks_the_grammar(compiler, tok):
    """After a greedy step a row gets no mask ahead; the next greedy step fills it only if the
    model's own pick is forbidden, and picks exactly what the filled mask would give."""
    digits = StructuredOutputsParams("regex", "[0-9]+")
    a, b = compiler.matcher(digits), compiler.matcher(digits)
    seven = tok.encode("7", add_special_tokens=False)[0]
    letter = tok.encode("a", add_special_tokens=False)[0]
    assert compiler.lazy  # the CPU default
    compiler.batch([a, b]).argmax(torch.zeros(2, 49152))  # a greedy step: both now lazy
    assert a.greedy and b.greedy
    compiler.prefetch([a, b])
    assert compiler._next is None  # nothing filled ahead for greedy rows
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(1))
    logits[0, seven] = 50.0  # a's own pick is a digit: allowed, no fill
    logits[2, letter] = 50.0  # b's own pick is a letter: forbidden, filled
    batch = compiler.batch([a, None, b])
    assert batch.where == [None, None]
    picks = batch.argmax(logits)
    assert batch.where[0] is None and batch.where[1] is not None
    compiler.lazy = False
    try:
        eager = compiler.batch([a, None, b])  # every mask filled: the reference
        assert eager.where[0] is not None
        masked = logits.clone()
        masked[[0, 2]] = logits[[0, 2]].masked_fill(~eager.allowed(49152, logits.device), -1e30)
    finally:
        compiler.lazy = True
    assert picks.tolist() == masked.argmax(dim=-1).tolist()
    assert picks[0] == seven and picks[2] != letter
    batch.apply(logits)  # a step that samples: masks are filled ahead again
    assert not a.greedy and not b.greedy
