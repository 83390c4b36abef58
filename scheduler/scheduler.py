"""Scheduler: continuous batching under a token budget (mixed steps, chunking, preemption)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

from model.inputs import (
    PoolingRow,
    PromptLogprobRow,
    SamplingRow,
    StepInput,
    StepOutput,
    TokenLogprob,
)
from model.pooler import add_chunk, finish
from model.sampling_params import SamplingParams
from scheduler.block_manager import BlockManager
from scheduler.sequence import Sequence, SequenceStatus
from scheduler.spec_decode import (
    DraftModel,
    DraftState,
    SpecGate,
    SpecStats,
    SpeculativeConfig,
    propose_ngram,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledBatch:
    """One step's plan: which sequences run how many tokens, and the StepInput for the runner."""

    seqs: list[Sequence]  # step_input.query_lens: how many tokens each runs
    sampling_seqs: list[Sequence]  # the sequences whose last scheduled token samples
    step_input: StepInput
    num_preempted: int = 0
    prompt_logprob_seqs: list[Sequence] = field(default_factory=list)  # one per prompt row
    pooling_seqs: list[Sequence] = field(default_factory=list)  # one per pooling row

    def row_matchers(self) -> list:
        """Each sampling row's grammar matcher: its sequence's, moved on by the draft tokens
        before the row (copies) when it speculates."""
        out = []
        for seq in self.sampling_seqs:
            m = seq.matcher
            out.append(m)
            for token in seq.draft_token_ids:
                m = None if m is None else m.advanced(token)
                out.append(m)
        return out


@dataclass(slots=True)
class SampledToken:
    """A token appended to a sequence by `update` (the engine detokenizes and reports it)."""

    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None = None
    # the sequence's length with this token (later ones of a step follow it); None: its last
    num_tokens: int | None = None


# the SamplingParams fields a SamplingRow copies as they are (temperature, top_k, ..., seed)
_ROW_PARAMS = {f.name for f in fields(SamplingRow)} & {f.name for f in fields(SamplingParams)}


class Scheduler:
    """vLLM-v1 style: no phases; each step every sequence's num_computed_tokens catches up."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        speculative_config: SpeculativeConfig | None = None,
        spec_max_rows: int = 0,
        draft_model: DraftModel | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = list(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.num_preemptions = 0
        self.speculative_config = speculative_config
        self.spec_max_rows = spec_max_rows  # no drafts past this many rows in a step
        self.draft_model = draft_model  # method draft_model: drafts from it instead of n-grams
        self.spec_stats = SpecStats()
        # None: draft whatever the speed
        self.spec_gate = SpecGate() if speculative_config is not None else None
        self.acceptance_lengths: list[int] = []  # 1 + accepted per verified draft, since taken

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        """Free its blocks and put it back at the front of waiting; it recomputes all its tokens."""
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.pooled = None  # NOTE: a MEAN sum restarts with the recompute
        seq.draft_token_ids = []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug(
            "preempted %s/%d (%d tokens)", seq.request_id, seq.sample_index, seq.num_tokens
        )

    def _held(self, seq: Sequence) -> bool:
        """Samples 1..n-1 wait until sample 0 computed the prompt, then share it via prefix hits."""
        lead = seq.leader
        if lead is None or not self.block_manager.enable_prefix_caching or lead.is_finished:
            return False
        if lead.num_prompt_tokens <= self.block_manager.block_size:
            return False  # no full prompt block to share: nothing to wait for
        return (
            lead.status != SequenceStatus.RUNNING
            or lead.num_computed_tokens < lead.num_prompt_tokens
        )

    def schedule(self) -> ScheduledBatch | None:
        """Plan one step: running sequences first, then waiting ones FCFS, under the token budget.

        Running sequences get their decode token or next prefill chunk; when blocks run out the
        most recently admitted running sequence is preempted (possibly the one being scheduled).
        Waiting sequences are admitted only in steps without a preemption, while blocks,
        `max_num_seqs` and the token budget allow; their prefix-cache hits are skipped.
        Returns None when there is nothing to run.
        """
        bm = self.block_manager
        seqs: list[Sequence] = []
        counts: list[int] = []  # tokens each of `seqs` runs
        budget = self.max_num_batched_tokens
        preempted = i = 0
        spec_rows = self.spec_max_rows - len(self.running)  # draft rows this step may take
        if self.speculative_config is None or (self.spec_gate and not self.spec_gate.allows()):
            spec_rows = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            seq.draft_token_ids = []
            if spec_rows > 0:
                draft = self._propose(seq, n, min(budget - n, spec_rows))
                if draft and bm.allocate_slots(seq, n + len(draft)) is not None:
                    seq.draft_token_ids = draft
                    seqs.append(seq)
                    counts.append(n + len(draft))
                    budget -= n + len(draft)
                    spec_rows -= len(draft)
                    i += 1
                    continue
            while bm.allocate_slots(seq, n) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted += 1
                if victim is seq:
                    break
            else:
                seqs.append(seq)
                counts.append(n)
                budget -= n
                i += 1
        held: list[Sequence] = []
        while (
            not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            if self._held(seq):
                held.append(self.waiting.popleft())
                continue
            hits, num_hit = bm.get_computed_blocks(seq)
            n = min(seq.num_tokens - num_hit, budget)
            if bm.allocate_slots(seq, n, hits) is None:
                break
            self.waiting.popleft()
            if seq.status == SequenceStatus.WAITING:
                seq.num_cached_tokens = num_hit
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(held))
        return self._build(seqs, counts, preempted) if seqs else None

    def _propose(self, seq: Sequence, n: int, room: int) -> list[int]:
        """Draft tokens for a decoding sequence: at most `room`, none past max_tokens or
        max_model_len, and (constrained) only a prefix its grammar accepts."""
        spec = self.speculative_config
        if (
            n != 1
            or seq.num_computed_tokens + 1 != seq.num_tokens
            or seq.num_output_tokens == 0
            or seq.pooler is not None
            or (seq.matcher is not None and seq.matcher.is_finished)
        ):
            return []
        state = seq.draft_state
        if state is None:
            state = seq.draft_state = DraftState(spec.num_speculative_tokens)
        if state.skip:
            state.skip -= 1
            return []
        room = min(room, state.k, self.max_model_len - seq.num_tokens)
        if seq.max_tokens is not None:
            room = min(room, seq.max_tokens - seq.num_output_tokens - 1)
        if room < 1:
            return []
        if self.draft_model is None:
            lo, hi = spec.prompt_lookup_min, spec.prompt_lookup_max
            draft = propose_ngram(seq.token_ids, room, lo, hi)
        else:  # NOTE: the draft model writes its K/V at the drafted positions: slots first
            if self.block_manager.allocate_slots(seq, 1 + room) is None:
                return []
            draft = self.draft_model.propose(seq, room, self.block_manager.block_size)
        if seq.matcher is not None:  # NOTE: only tokens the grammar takes are verified
            del draft[seq.matcher.valid_prefix(draft) :]
        if not draft:
            self.block_manager.free_tail(seq)  # blocks a draft model's slots took
        return draft

    def _build(self, seqs: list[Sequence], counts: list[int], preempted: int) -> ScheduledBatch:
        bs = self.block_manager.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        sample_indices: list[int] = []
        num_sampled: list[int] = []
        rows: list[SamplingRow] = []
        sampling_seqs: list[Sequence] = []
        prompt_rows: list[PromptLogprobRow] = []
        prompt_seqs: list[Sequence] = []
        pooling_rows: list[PoolingRow] = []
        for k, (seq, n) in enumerate(zip(seqs, counts, strict=True)):
            draft = seq.draft_token_ids  # NOTE: verified after the sequence's own tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start : end - len(draft)])
            ids.extend(draft)
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            context_lens.append(end)
            if seq.wants_prompt_logprobs and (row := self._prompt_row(seq, k, start, end)):
                prompt_rows.append(row)
                prompt_seqs.append(seq)
            if seq.pooler is not None:
                pooling_rows.append(
                    PoolingRow(k, seq.pooler.pooling_type, start == 0, end == seq.num_tokens)
                )
            elif end - len(draft) == seq.num_tokens:
                sample_indices.append(k)
                num_sampled.append(1 + len(draft))
                rows.extend(self._sampling_row(seq, j) for j in range(1 + len(draft)))
                sampling_seqs.append(seq)
        step_input = StepInput(
            input_ids=ids,
            positions=positions,
            slot_mapping=slots,
            query_lens=counts,
            context_lens=context_lens,
            # NOTE: a freed block's entry reads block 0: behind the window, masked, never written
            block_tables=[[max(b, 0) for b in s.block_table] for s in seqs],
            sample_indices=sample_indices,
            sampling=rows,
            prompt_logprobs=prompt_rows,
            pooling=pooling_rows,
            num_sampled=num_sampled if len(rows) > len(sample_indices) else [],
        )
        pooling_seqs = [seqs[r.seq_index] for r in pooling_rows]
        return ScheduledBatch(seqs, sampling_seqs, step_input, preempted, prompt_seqs, pooling_seqs)

    @staticmethod
    def _prompt_row(seq: Sequence, k: int, start: int, end: int) -> PromptLogprobRow | None:
        """The chunk's positions that predict a prompt token not scored yet (a recompute after
        preemption scores none twice); position p predicts token p + 1."""
        first = max(start, len(seq.prompt_logprobs))
        stop = min(end, seq.num_prompt_tokens - 1)
        if first >= stop:
            return None
        targets = seq.token_ids[first + 1 : stop + 1]
        return PromptLogprobRow(k, first - start, targets, seq.params.prompt_logprobs)

    def _sampling_row(self, seq: Sequence, j: int = 0) -> SamplingRow:
        """The row of the sequence's next token, or (j > 0) of the token after its first j draft
        tokens, as it would be once they were accepted: same step, seed and penalty counts."""
        if j:
            row = self._sampling_row(seq)
            draft = seq.draft_token_ids[:j]
            banned = None
            if seq.num_output_tokens + j < seq.params.min_tokens:
                banned = row.banned_token_ids
            out = row.output_token_ids
            return replace(
                row,
                step=row.step + j,
                output_token_ids=None if out is None else out + draft,
                banned_token_ids=banned,
                seq_key=None,  # NOTE: the sampler counts penalties of these rows from the lists
            )
        p = seq.params
        banned = None
        if seq.num_output_tokens < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned = sorted(set(stops)) or None
        return SamplingRow(
            **{name: getattr(p, name) for name in _ROW_PARAMS},
            sample_index=seq.sample_index,
            step=seq.num_output_tokens,
            num_logprobs=p.logprobs,
            prompt_token_ids=seq.prompt_token_ids if p.repetition_penalty != 1.0 else None,
            output_token_ids=seq.output_token_ids if p.needs_penalties else None,
            banned_token_ids=banned,
            seq_key=seq.request_id if p.needs_penalties else None,  # penalty counts kept
        )

    def update(self, batch: ScheduledBatch, output: StepOutput) -> list[SampledToken]:
        """Advance computed tokens, append sampled ones, cache full blocks, finish and free."""
        bm = self.block_manager
        for seq, n in zip(batch.seqs, batch.step_input.query_lens, strict=True):
            seq.num_computed_tokens += n - len(seq.draft_token_ids)  # drafts: once accepted
        for seq, lps in zip(batch.prompt_logprob_seqs, output.prompt_logprobs, strict=True):
            seq.prompt_logprobs.extend(lps)
        if batch.pooling_seqs:
            self._pool(batch.pooling_seqs, output.pooled)
        sampled: list[SampledToken] = []
        counts = batch.step_input.num_sampled or [1] * len(batch.sampling_seqs)
        at = 0
        for seq, c in zip(batch.sampling_seqs, counts, strict=True):
            self._append(seq, output, at, c, sampled)
            at += c
        for seq in batch.seqs:
            if not seq.is_finished:
                bm.cache_full_blocks(seq)
        if any(s.is_finished for s in batch.sampling_seqs):
            for seq in batch.sampling_seqs:
                if seq.is_finished and seq.block_table:
                    bm.deallocate(seq)
            self.running = [s for s in self.running if not s.is_finished]
        return sampled

    def _append(
        self, seq: Sequence, output: StepOutput, at: int, count: int, sampled: list[SampledToken]
    ) -> None:
        """Append the sequence's sampled tokens from row `at` on: each row's token, while it
        equals the draft token the next row was computed after (then that row's K/V is kept)."""
        draft, accepted = seq.draft_token_ids, 0
        for j in range(count):
            token = output.token_ids[at + j]
            seq.token_ids.append(token)
            logprob = output.logprobs[at + j] if output.logprobs else None
            sampled.append(SampledToken(seq, token, logprob, seq.num_tokens))
            if seq.matcher is None:
                self._check_stop(seq, token)
            else:
                matched = seq.matcher.accept(token)
                self._check_stop(seq, token)
                if not seq.is_finished and (not matched or seq.matcher.is_finished):
                    seq.status = SequenceStatus.FINISHED_STOPPED  # the grammar is complete
            if j == len(draft) or token != draft[j]:
                break
            accepted += 1
            if seq.is_finished:
                break
            seq.num_computed_tokens += 1
        if draft:
            seq.draft_token_ids = []
            k_max = self.speculative_config.num_speculative_tokens
            seq.draft_state.observe(len(draft), accepted, k_max)
            self.spec_stats.add(len(draft), accepted)
            self.acceptance_lengths.append(1 + accepted)
            if seq.metrics is not None:
                seq.metrics.num_draft_tokens += len(draft)
                seq.metrics.num_accepted_tokens += accepted
            if not seq.is_finished:
                self.block_manager.free_tail(seq)

    def _pool(self, seqs: list[Sequence], pooled: list[list[float]]) -> None:
        """Fold each chunk into its sequence; one whose prompt is done gets its embedding,
        registers its full blocks in the prefix cache and finishes (its blocks freed)."""
        done = []
        for seq, part in zip(seqs, pooled, strict=True):
            seq.pooled = add_chunk(seq.pooled, part, seq.pooler.pooling_type)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.pooled = finish(seq.pooled, seq.num_tokens, seq.pooler)
                self.block_manager.cache_full_blocks(seq)
                done.append(seq)
        if done:
            self.finish(done, SequenceStatus.FINISHED_STOPPED)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.status = SequenceStatus.FINISHED_STOPPED
                return
            if token in p.stop_token_ids:
                seq.status = SequenceStatus.FINISHED_STOPPED
                seq.stop_reason = token
                return
        if seq.max_tokens is not None and seq.num_output_tokens >= seq.max_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
        elif seq.num_tokens >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED

    def finish(self, seqs: Iterable[Sequence], status: SequenceStatus) -> None:
        """Finish sequences outside a step (abort, stop string, error) and free their blocks."""
        seqs = list(seqs)
        for seq in seqs:
            seq.status = status
            if seq.block_table:
                self.block_manager.deallocate(seq)
        done = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in done]
        self.waiting = deque(s for s in self.waiting if id(s) not in done)
