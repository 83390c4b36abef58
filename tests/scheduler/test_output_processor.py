"""OutputProcessor without a model: scripted detokenizers, plain Sequences, a real Scheduler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.output_processor import OutputProcessor, Request
from scheduler.outputs import RequestMetrics
from scheduler.scheduler import SampledToken, Scheduler
from scheduler.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.timeout(10)

EOS = 0


class ScriptedDetokenizer:
    """Each step returns the next scripted (text, stop string, tokens whose text is out)."""

    def __init__(self, *script: tuple[str, str | None, int]) -> None:
        self.script = list(script)
        self.num_returned_tokens = 0

    def step(self, token_ids: list[int]) -> tuple[str, str | None]:
        text, stop, self.num_returned_tokens = self.script.pop(0)
        return text, stop

    def flush(self) -> str:
        return "<held>"


def make_processor() -> tuple[OutputProcessor, Scheduler]:
    scheduler = Scheduler(
        BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64
    )
    tokenizer = SimpleNamespace(eos_token_ids=[EOS])
    return OutputProcessor(tokenizer, scheduler), scheduler


def add_request(
    processor: OutputProcessor, rid: str, n: int, params: SamplingParams, *detokenizers
) -> Request:
    metrics = RequestMetrics(arrival_time=0.0)
    seqs = [Sequence(rid, [1, 2, 3], params, sample_index=i, max_tokens=8) for i in range(n)]
    for seq, detokenizer in zip(seqs, detokenizers, strict=True):
        seq.status, seq.metrics, seq.detokenizer = SequenceStatus.RUNNING, metrics, detokenizer
    req = Request(rid, [1, 2, 3], seqs, metrics)
    processor.add(req)
    return req


def test_logprobs_follow_returned_text_and_a_stop_string_finishes_the_sample() -> None:
    processor, _ = make_processor()
    detok = ScriptedDetokenizer(("", None, 0), ("ab", None, 2), ("c", "x", 2))
    req = add_request(processor, "r", 1, SamplingParams(logprobs=1, stop=["x"]), detok)
    (seq,) = req.seqs
    gaps: list[float] = []
    deltas = []
    for token in (10, 11, 12):
        seq.token_ids.append(token)
        (out,) = processor.process([SampledToken(seq, token, f"lp{token}")], gaps)
        deltas.append(out.outputs[0])
    assert [d.text for d in deltas] == ["", "ab", "c"]
    # NOTE: held-back text holds its logprobs back too; the stop string's token never shows
    assert [d.logprobs for d in deltas] == [None, ["lp10", "lp11"], None]
    assert [d.finish_reason for d in deltas] == [None, None, "stop"]
    assert deltas[-1].stop_reason == "x" and seq.status == SequenceStatus.FINISHED_STOPPED
    assert out.finished and "r" not in processor.requests
    assert len(gaps) == 2 and req.metrics.finished_time is not None
    assert (processor.prompt_tokens_total, processor.generation_tokens_total) == (3, 3)


def test_eos_is_hidden_and_held_text_flushed_on_finish() -> None:
    processor, _ = make_processor()
    req = add_request(processor, "r", 1, SamplingParams(), ScriptedDetokenizer(("", None, 0)))
    (seq,) = req.seqs
    seq.token_ids.append(EOS)
    seq.status = SequenceStatus.FINISHED_STOPPED  # as Scheduler.update leaves it
    (out,) = processor.process([SampledToken(seq, EOS)], [])
    assert out.outputs[0].text == "<held>" and out.outputs[0].finish_reason == "stop"
    assert out.finished


def test_finish_request_ends_only_the_live_samples() -> None:
    processor, _ = make_processor()
    assert processor.finish_request("missing") is None
    req = add_request(processor, "r", 2, SamplingParams(n=2), None, None)
    req.seqs[0].status = SequenceStatus.FINISHED_LENGTH_CAPPED
    out = processor.finish_request("r", SequenceStatus.FINISHED_ERROR, "boom")
    assert [(o.index, o.finish_reason) for o in out.outputs] == [(1, "error")]
    assert out.finished and out.error == "boom" and processor.requests == {}
