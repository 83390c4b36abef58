"""Sampler: exact supports of top-k/top-p/min-p, penalties vs a plain formula, seeds vs batches."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from model.inputs import SamplingRow
from model.sampler import Sampler

pytestmark = pytest.mark.timeout(60)

# a crafted distribution over a 1000-token vocab: ten likely tokens, the rest ~1e-9 each
PROBS = [0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.01, 0.01]
VOCAB = 1000


def crafted_logits(num_rows: int) -> torch.Tensor:
    probs = torch.full((VOCAB,), 1e-9)
    probs[: len(PROBS)] = torch.tensor(PROBS)
    return probs.log().expand(num_rows, VOCAB).clone()  # [num_rows, VOCAB]


def support(row: SamplingRow, num_rows: int = 2000) -> set[int]:
    """Which tokens appear when `num_rows` identical rows sample the crafted distribution once."""
    out = Sampler(seed=1)(crafted_logits(num_rows), [row] * num_rows)
    return set(out.token_ids)


def test_greedy_is_argmax_with_lowest_index_on_ties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 49152)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1.0  # a tie: torch.argmax takes index 7
    out = Sampler(0)(logits, [SamplingRow()] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[3] == 7
    assert out.logprobs == [None] * 8
    # numpy's argmax serves CPU rows: torch's answer on NaN, all -inf and strided rows too
    logits[5, 11] = logits[5, 4] = float("nan")
    logits[6] = float("-inf")
    assert Sampler(0)(logits, [SamplingRow()] * 8).token_ids == logits.argmax(dim=-1).tolist()
    assert Sampler(0)(logits[:, ::2], [SamplingRow()] * 8).token_ids == (
        logits[:, ::2].argmax(dim=-1).tolist()
    )


def test_all_greedy_fast_path_equals_general_path() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 49152) * 4
    fast = Sampler(0)(logits, [SamplingRow()] * 64)
    # a logprobs request, or one sampling row, sends the batch down the general path
    general = Sampler(0)(logits, [SamplingRow(num_logprobs=0)] * 64)
    mixed = Sampler(0)(logits, [SamplingRow()] * 63 + [SamplingRow(temperature=1.0)])
    assert fast.token_ids == general.token_ids
    assert fast.token_ids[:63] == mixed.token_ids[:63]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (SamplingRow(temperature=1.0, top_k=3), {0, 1, 2}),
        (SamplingRow(temperature=1.0, top_p=0.7), {0, 1, 2, 3}),  # mass before token 4: 0.75
        (SamplingRow(temperature=1.0, top_p=0.45), {0, 1}),  # mass before token 2: 0.5
        (SamplingRow(temperature=1.0, min_p=0.25), {0, 1, 2, 3, 4}),  # floor 0.075
        (SamplingRow(temperature=1.0, top_k=5, top_p=0.8), {0, 1, 2, 3}),  # top 5 renormalised
        (SamplingRow(temperature=0.5, top_p=0.7), {0, 1}),  # temperature first: p^2 renormalised
        (SamplingRow(temperature=1.0, top_k=8, min_p=0.2), {0, 1, 2, 3, 4, 5}),  # floor .0612
    ],
)
def test_filters_keep_exactly_the_right_support(row: SamplingRow, expected: set[int]) -> None:
    assert support(row) == expected


def test_unfiltered_sampling_follows_the_distribution() -> None:
    n = 20000
    counts = torch.bincount(
        torch.tensor(Sampler(3)(crafted_logits(n), [SamplingRow(temperature=1.0)] * n).token_ids),
        minlength=VOCAB,
    )
    freq = counts[: len(PROBS)].float() / n
    assert torch.allclose(freq, torch.tensor(PROBS), atol=0.015), freq.tolist()
    assert counts[len(PROBS) :].sum() <= 2  # the 990 near-impossible tokens


@pytest.mark.parametrize("scale", [(12.0,) * 3, (3.0,) * 3, (0.3,) * 3, (12.0, 3.0, 0.3)])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (0, 0.3), (40, 0.95), (2000, 0.8)])
def test_candidate_top_p_matches_full_sort(
    scale: tuple[float, ...], top_k: int, top_p: float
) -> None:
    """Peaky rows end in the first candidates, wider ones in the second stage, flat ones sort."""
    torch.manual_seed(2)
    x = torch.randn(3, 49152) * torch.tensor(scale)[:, None]  # a mixed batch in the last case
    ours = Sampler(0)._top_k_top_p(x.clone(), [0, 1, 2], [top_k] * 3, [top_p] * 3)
    ref = Sampler._sort_top_k_top_p(x.clone(), [top_k] * 3, [top_p] * 3)
    assert torch.equal(ours.isfinite(), ref.isfinite())
    assert torch.equal(ours[ours.isfinite()], x[ours.isfinite()])


def reference_penalties(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The plain per-token formulas: HF repetition penalty, then OpenAI presence/frequency."""
    out = logits.clone()
    seen = set(row.prompt_token_ids or []) | set(row.output_token_ids or [])
    for tok in seen:
        v = out[tok].item()
        out[tok] = v / row.repetition_penalty if v > 0 else v * row.repetition_penalty
    for tok in set(row.output_token_ids or []):
        count = (row.output_token_ids or []).count(tok)
        out[tok] -= row.frequency_penalty * count + row.presence_penalty
    return out


def test_penalties_match_reference_formula() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, 200) * 3
    rows = [
        SamplingRow(
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            prompt_token_ids=[1, 2, 3, 3, 50],
            output_token_ids=[3, 7, 7, 7, 199, 0],
        ),
        SamplingRow(),  # untouched
        SamplingRow(presence_penalty=-1.0, frequency_penalty=2.0, output_token_ids=[5, 5, 6]),
    ]
    work = logits.clone()
    Sampler(0)._apply_penalties(work, rows)
    for i, row in enumerate(rows):
        assert torch.allclose(work[i], reference_penalties(logits[i], row), atol=1e-6), i


def test_penalty_counts_carry_over_steps_and_equal_a_recount() -> None:
    """A sequence's counts live from step to step (only its new tokens are added) and equal a
    recount from its lists; a key that now names another sequence, or a gap, recounts."""
    gen = torch.Generator().manual_seed(0)
    kept, fresh = Sampler(0), Sampler(0)
    out: list[int] = []
    first = None
    for tok in [3, 3, 7, 1, 3, 9]:
        out.append(tok)
        row = SamplingRow(
            presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3,
            prompt_token_ids=[1, 2], output_token_ids=list(out), seq_key="r",
        )  # fmt: skip
        logits = torch.randn(1, 16, generator=gen)
        a, b = logits.clone(), logits.clone()
        kept._apply_penalties(a, [row])
        fresh._apply_penalties(b, [replace(row, seq_key=None)])
        assert torch.equal(a, b)
        assert torch.allclose(a[0], reference_penalties(logits[0], row), atol=1e-6)
        counts = kept._counts[("r", 0)]
        first = first or counts
        assert counts is first and counts.num_counted == len(out)  # one object, added to
    assert first.output.tolist() == [0, 1, 0, 3, 0, 0, 0, 1, 0, 1] + [0] * 6
    assert fresh._counts == {}

    def penalized(sampler: Sampler, ids: list[int], key: str = "r") -> list[float]:
        logits = torch.zeros(1, 16)
        row = SamplingRow(frequency_penalty=1.0, output_token_ids=ids, seq_key=key)
        sampler._apply_penalties(logits, [row])
        return logits[0].tolist()

    assert penalized(kept, [5]) == [0.0] * 5 + [-1.0] + [0.0] * 10  # shorter: another sequence
    assert penalized(kept, [5, 5]) == [0.0] * 5 + [-2.0] + [0.0] * 10
    assert penalized(kept, [4, 6]) == [0.0] * 4 + [-1.0, 0.0, -1.0] + [0.0] * 9  # last differs
    assert penalized(kept, [0], key="other")[0] == -1.0
    assert list(kept._counts) == [("other", 0)]  # "r" was not in that step: dropped


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[4.0, 3.5, -1.0, 0.0]])
    repeated = SamplingRow(repetition_penalty=2.0, prompt_token_ids=[0], output_token_ids=[])
    assert Sampler(0)(logits, [repeated]).token_ids == [1]  # 4/2 = 2 < 3.5
    freq = SamplingRow(frequency_penalty=0.2, output_token_ids=[0, 0])
    assert Sampler(0)(logits, [freq]).token_ids == [0]  # 4 - 0.4 = 3.6 > 3.5
    freq.output_token_ids = [0, 0, 0]
    assert Sampler(0)(logits, [freq]).token_ids == [1]  # 4 - 0.6 = 3.4 < 3.5


def test_logit_bias_forces_and_bans() -> None:
    torch.manual_seed(4)
    logits = torch.randn(200, 49152)
    forced = Sampler(0)(logits, [SamplingRow(temperature=1.0, logit_bias={123: 100.0})] * 200)
    assert set(forced.token_ids) == {123}
    top = logits[0].argmax().item()
    banned = Sampler(0)(logits[:1], [SamplingRow(logit_bias={top: -100.0})])
    assert banned.token_ids == [logits[0].topk(2).indices[1].item()]


def test_banned_ids_are_never_sampled() -> None:
    row = SamplingRow(temperature=1.0, banned_token_ids=[0, 1, 2])
    assert support(row) == {3, 4, 5, 6, 7, 8, 9}
    greedy = Sampler(0)(crafted_logits(1), [SamplingRow(banned_token_ids=[0])])
    assert greedy.token_ids == [1]


def test_bad_input_raises_with_numbers() -> None:
    with pytest.raises(ValueError, match="3 sampling rows"):
        Sampler(0)(torch.zeros(2, 10), [SamplingRow()] * 3)
    with pytest.raises(ValueError, match="token id 10 "):
        Sampler(0)(torch.zeros(1, 10), [SamplingRow(logit_bias={10: 1.0})])
    with pytest.raises(ValueError, match="token id -1 "):
        Sampler(0)(torch.zeros(1, 10), [SamplingRow(presence_penalty=1.0, output_token_ids=[-1])])


def test_logprobs_are_raw_log_softmax_with_rank_and_sorted_top() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, 49152) * 3
    rows = [
        SamplingRow(num_logprobs=5),
        SamplingRow(
            temperature=0.7,
            top_p=0.9,
            num_logprobs=0,
            presence_penalty=1.5,
            output_token_ids=[1, 2],
        ),
        SamplingRow(temperature=1.0),  # asks none
        SamplingRow(logit_bias={17: 100.0}, num_logprobs=20),  # forced, low raw rank
    ]
    out = Sampler(0)(logits, rows)
    ref = logits.log_softmax(dim=-1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert math.isclose(lp.logprob, ref[i, tok].item(), abs_tol=1e-5)
        assert lp.rank == int((ref[i] > ref[i, tok]).sum()) + 1
        assert len(lp.top) == rows[i].num_logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        vals, ids = ref[i].topk(len(lp.top))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert torch.allclose(torch.tensor(values), vals, atol=1e-5)
    assert out.logprobs[0].rank == 1
    assert out.token_ids[3] == 17 and out.logprobs[3].rank > 1


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(6)
    logits = torch.randn(10, 49152) * 6
    seeded = [
        SamplingRow(temperature=1.0, top_p=0.95, seed=42, sample_index=k, step=3) for k in range(2)
    ]
    alone = [Sampler(0)(logits[k : k + 1], [seeded[k]]).token_ids[0] for k in range(2)]
    for sampler_seed, perm in [(1, [7, 0, 3, 1, 9, 2, 4, 5, 6, 8]), (9, list(range(10))[::-1])]:
        # rows 0 and 1 of `logits` carry the seeded rows; the others are unrelated traffic
        rows = [seeded[j] if j < 2 else SamplingRow(temperature=0.9, top_k=5) for j in perm]
        out = Sampler(sampler_seed)(logits[perm], rows)
        for pos, j in enumerate(perm):
            if j < 2:
                assert out.token_ids[pos] == alone[j]


def test_seeds_and_steps_change_the_draw() -> None:
    logits = torch.zeros(1, 1000)  # uniform: every draw is one uniform number, made visible

    def draws(seed: int) -> list[int]:
        rows = [SamplingRow(temperature=1.0, seed=seed, step=s) for s in range(20)]
        return Sampler(0)(logits.expand(20, 1000), rows).token_ids

    a, b = draws(1), draws(2)
    assert a == draws(1)  # reproducible
    assert a != b
    assert len(set(a)) > 10  # steps differ


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(50, 1000)
    rows = [SamplingRow(temperature=1.0)] * 50
    assert Sampler(5)(logits, rows).token_ids == Sampler(5)(logits, rows).token_ids
    assert Sampler(5)(logits, rows).token_ids != Sampler(6)(logits, rows).token_ids
