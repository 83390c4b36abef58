"""RequestAccumulator over plain RequestOutput deltas: choices, logprob entries, errors, usage."""

from __future__ import annotations

import pytest

from scheduler import TokenLogprob
from scheduler.outputs import CompletionOutput, RequestMetrics, RequestOutput
from server.accumulator import RequestAccumulator
from server.errors import APIError

pytestmark = pytest.mark.timeout(10)


async def _stream(items):
    for item in items:
        yield item


def _out(rid, samples, *, cached=0, metrics=None, error=None, finished=False) -> RequestOutput:
    return RequestOutput(rid, [1, 2, 3], samples, finished, cached, metrics, error)


async def test_two_prompts_n2_gather_text_tokens_reasons_and_entries() -> None:
    lp = TokenLogprob(7, -0.5, 1, [])
    acc = RequestAccumulator([3, 5], 2, lambda i, lps: [(i, x.token_id) for x in lps], True)
    outs = [
        (0, _out("r-0", [CompletionOutput(0, "a", [7], [lp], 1)], cached=2)),
        (1, _out("r-1", [CompletionOutput(1, "x", [7], None, 1)], metrics=RequestMetrics(1.0))),
        (0, _out("r-0", [CompletionOutput(0, "b", [7], [lp], 2, "length")], cached=2)),
        (0, _out("r-0", [CompletionOutput(1, "", [], None, 0, "abort")], cached=2, finished=True)),
    ]
    seen = [(i, co.text, entries) async for i, co, entries in acc.deltas(_stream(outs))]
    assert seen == [(0, "a", [(0, 7)]), (3, "x", None), (0, "b", [(0, 7)]), (1, "", None)]
    c = acc.choices
    assert [(x.text, x.num_tokens, x.finish_reason) for x in c] == [
        ("ab", 2, "length"), ("", 0, "abort"), ("", 0, None), ("x", 1, None),
    ]  # fmt: skip
    assert c[0].logprobs == [(0, 7), (0, 7)] and c[3].logprobs == []
    usage = acc.usage()
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (8, 3, 11)
    assert usage.prompt_tokens_details.cached_tokens == 2  # per prompt, not per output
    assert acc.timings().predicted_n == 3


async def test_engine_error_is_a_500_and_timings_only_when_asked() -> None:
    acc = RequestAccumulator([3], 1, lambda i, lps: [])
    outs = [(0, _out("r", [CompletionOutput(0, "", [], None, 0, "error")], error="worker died"))]
    with pytest.raises(APIError, match="request r failed: worker died") as e:
        async for _ in acc.deltas(_stream(outs)):
            pass
    assert e.value.status_code == 500 and acc.timings() is None


async def test_timings_report_draft_tokens_only_when_drafted() -> None:
    """llama-server's draft_n / draft_n_accepted: summed over prompts, left out without drafts."""
    m0, m1 = RequestMetrics(1.0), RequestMetrics(1.0, num_draft_tokens=8, num_accepted_tokens=5)
    acc = RequestAccumulator([3], 1, lambda i, lps: [], True)
    await acc.drain(_stream([(0, _out("r", [CompletionOutput(0, "a", [7], None, 1)], metrics=m0))]))
    assert "draft_n" not in acc.timings().model_dump()
    acc.metrics[0] = m1
    t = acc.timings()
    assert (t.draft_n, t.draft_n_accepted) == (8, 5)
    assert t.model_dump()["draft_n_accepted"] == 5
