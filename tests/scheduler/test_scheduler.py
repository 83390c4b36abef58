"""Scheduler with plain Sequences (no model): budget, FCFS, mixed steps, chunks, preemption."""

from __future__ import annotations

import pytest

from model.inputs import StepOutput
from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.scheduler import ScheduledBatch, Scheduler
from scheduler.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.timeout(30)

EOS = 2


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=64, caching=True, max_len=256):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(
        bm,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_tokens,
        max_model_len=max_len,
        eos_token_ids=[EOS],
    )


def seq(rid: str, n: int, max_tokens: int = 100, first: int = 10, **params) -> Sequence:
    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)
    return Sequence(rid, list(range(first, first + n)), p, max_tokens=max_tokens)


def step(s: Scheduler, tokens: list[int] | int = 7) -> ScheduledBatch | None:
    """One step with a fake model that samples `tokens` (one per sampling sequence)."""
    batch = s.schedule()
    if batch is None:
        return None
    k = len(batch.sampling_seqs)
    ids = tokens if isinstance(tokens, list) else [tokens] * k
    s.update(batch, StepOutput(token_ids=ids[:k], logprobs=[None] * k))
    s.block_manager.check_integrity(s.running)
    return batch


def test_mixed_prefill_and_decode_under_token_budget_with_chunking():
    s = make(max_tokens=10)
    a, b = seq("a", 6), seq("b", 8, first=50)
    s.add(a)
    s.add(b)
    b1 = step(s)
    inp = b1.step_input
    assert inp.query_lens == [6, 4] and inp.context_lens == [6, 4]  # b is chunked
    assert inp.input_ids == [10, 11, 12, 13, 14, 15, 50, 51, 52, 53]
    assert inp.positions == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert inp.block_tables == [[0, 1], [2]]
    assert inp.slot_mapping == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    assert inp.sample_indices == [0]  # b is mid-prompt: no sample
    assert a.token_ids[-1] == 7 and b.num_output_tokens == 0
    b2 = step(s)  # a decodes, b finishes its prompt, in the same step
    assert b2.step_input.query_lens == [1, 4]
    assert b2.step_input.input_ids == [7, 54, 55, 56, 57]
    assert b2.step_input.positions == [6, 4, 5, 6, 7]
    assert b2.step_input.slot_mapping == [6, 12, 13, 14, 15]
    assert b2.step_input.sample_indices == [0, 1]
    assert [r.step for r in b2.step_input.sampling] == [1, 0]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (7, 8)


def test_fcfs_admission_and_max_num_seqs():
    s = make(max_num_seqs=2)
    a, b, c = seq("a", 3, max_tokens=2), seq("b", 3), seq("c", 3)
    for x in (a, b, c):
        s.add(x)
    assert step(s).seqs == [a, b]
    assert list(s.waiting) == [c] and c.status == SequenceStatus.WAITING
    assert step(s).seqs == [a, b]  # a reaches max_tokens=2 and frees its slot
    assert a.status == SequenceStatus.FINISHED_LENGTH_CAPPED and a.finish_reason == "length"
    assert a.block_table == []
    assert step(s).seqs == [b, c]


def test_budget_smaller_than_running_set_leaves_tail_for_next_step():
    s = make(max_tokens=2)
    seqs = [seq(f"s{i}", 1, first=20 + i) for i in range(3)]
    for x in seqs:
        s.add(x)
    assert step(s).seqs == seqs[:2]
    assert step(s).seqs == seqs[:2]  # running first: s2 still waits for budget
    assert s.waiting[0] is seqs[2]


def test_preemption_picks_newest_and_resumes_by_recompute():
    s = make(num_blocks=6, block_size=2, caching=False)
    a, b, c = seq("a", 3, max_tokens=3), seq("b", 3, first=30), seq("c", 3, first=60)
    for x in (a, b, c):
        s.add(x)
    step(s)  # 2 blocks each: pool full
    step(s)  # 4 tokens each still fit
    assert s.block_manager.num_free_blocks == 0
    batch = step(s)  # a needs a 3rd block: c (newest) is preempted; b fits in what c freed
    assert batch.num_preempted == 1 and s.num_preemptions == 1
    assert batch.seqs == [a, b]
    assert list(s.waiting) == [c]
    assert c.status == SequenceStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.token_ids == [60, 61, 62, 7, 7] and c.block_table == []
    assert a.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    batch = step(s, [8, 9])  # c resumes: prompt + generated tokens recomputed, then it samples
    assert batch.seqs == [b, c]
    assert batch.step_input.query_lens == [1, 5]
    assert batch.step_input.input_ids == [7, 60, 61, 62, 7, 7]
    assert [r.step for r in batch.step_input.sampling] == [3, 2]
    assert (b.output_token_ids, c.output_token_ids) == ([7, 7, 7, 8], [7, 7, 9])
    assert c.num_prompt_tokens == 3


def test_sequence_being_scheduled_can_be_its_own_victim():
    s = make(num_blocks=4, block_size=2, caching=False)
    a, b = seq("a", 3), seq("b", 4, first=30)
    s.add(a)
    s.add(b)
    step(s)  # 2 blocks each; then a has 4 tokens (fits), b has 5 (needs a 3rd block)
    batch = step(s)
    assert batch.seqs == [a] and batch.num_preempted == 1
    assert list(s.waiting) == [b] and b.status == SequenceStatus.PREEMPTED
    assert s.block_manager.num_free_blocks == 2


def test_max_model_len_caps_length():
    s = make(num_blocks=2, block_size=2, caching=False, max_len=4)
    a = seq("a", 3)
    s.add(a)
    step(s)
    assert a.num_tokens == 4 and a.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    assert s.schedule() is None
    assert s.block_manager.num_free_blocks == 2 and s.block_manager.check_integrity()


def test_stop_checks_eos_stop_ids_min_tokens_ignore_eos():
    s = make()
    a = seq("a", 2)
    b = seq("b", 2, stop_token_ids=[5])
    c = seq("c", 2, min_tokens=2, stop_token_ids=[5])
    d = seq("d", 2, ignore_eos=True, max_tokens=2)
    for x in (a, b, c, d):
        s.add(x)
    batch = step(s, [EOS, 5, EOS, EOS])
    rows = batch.step_input.sampling
    assert [r.banned_token_ids for r in rows] == [None, None, [EOS, 5], None]
    assert (a.status, a.stop_reason) == (SequenceStatus.FINISHED_STOPPED, None)
    assert (b.status, b.stop_reason) == (SequenceStatus.FINISHED_STOPPED, 5)
    assert c.status == d.status == SequenceStatus.RUNNING  # before min_tokens / eos ignored
    batch = step(s, [5, 3])
    assert batch.seqs == [c, d]
    assert (c.status, c.stop_reason) == (SequenceStatus.FINISHED_STOPPED, 5)
    assert d.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    assert s.running == [] and s.block_manager.num_free_blocks == 64


def test_n_samples_wait_for_leader_prompt_then_share_blocks():
    s = make(block_size=4, max_tokens=6)
    lead = seq("r", 9)
    sib = seq("r", 9)
    sib.sample_index, sib.leader = 1, lead
    other = seq("o", 2, first=90)
    for x in (lead, sib, other):
        s.add(x)
    b1 = step(s)
    assert b1.seqs == [lead]  # chunk of 6: sibling held, budget spent
    b2 = step(s)
    assert b2.seqs == [lead, other]  # leader's prompt not done yet: sibling still held
    assert list(s.waiting) == [sib]
    b3 = step(s)
    assert b3.seqs == [lead, other, sib]
    assert sib.num_cached_tokens == 8 and sib.block_table[:2] == lead.block_table[:2]
    assert b3.step_input.query_lens == [1, 1, 1]
    assert [s.block_manager.blocks[b].ref_count for b in lead.block_table[:2]] == [2, 2]
    assert b3.step_input.sampling[2].sample_index == 1


def test_finish_frees_running_and_waiting():
    s = make(max_num_seqs=1)
    a, b = seq("a", 3), seq("b", 3)
    s.add(a)
    s.add(b)
    step(s)
    s.finish([a, b], SequenceStatus.FINISHED_ABORTED)
    assert a.finish_reason == b.finish_reason == "abort"
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 64
    assert s.schedule() is None


def test_status_order_and_finish_reason_map():
    st = SequenceStatus
    assert st.WAITING < st.RUNNING < st.PREEMPTED < st.FINISHED_STOPPED
    assert not st.PREEMPTED.is_finished and st.FINISHED_STOPPED.is_finished
    assert [Sequence("x", [1], status=v).finish_reason for v in st] == [
        None,
        None,
        None,
        "stop",
        "length",
        "abort",
        "error",
    ]


def test_n_samples_with_no_full_prompt_block_are_not_held():
    s = make(block_size=4)
    lead, sib = seq("r", 4), seq("r", 4)
    sib.sample_index, sib.leader = 1, lead
    s.add(lead)
    s.add(sib)
    assert step(s).seqs == [lead, sib]
