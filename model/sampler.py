"""Sampler: logits → token ids (+ logprobs) for one step, batched over rows, in vLLM's order.

Grammar masks → penalties → logit_bias → banned ids → greedy argmax → temperature → top-k → top-p
→ min-p → sample; each stage is one tensor op over the rows that need it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import TYPE_CHECKING

import torch

from model.bitmask import argmax_free
from model.inputs import SamplingRow, StepOutput, TokenLogprob

if TYPE_CHECKING:
    from model.constraints import ConstraintBatch

logger = logging.getLogger(__name__)

_GREEDY_EPS = 1e-5  # temperatures below this are greedy (the one threshold)
# top-p rows look at this many best tokens, then more; only a wider nucleus falls back to a sort
_TOP_P_CANDIDATES = (256, 4096)
_MAX_TOPK = 1024  # larger top_k values go through the full sort as well


def row_seed(seed: int, sample_index: int, step: int) -> int:
    """A 63-bit generator seed from (seed, sample_index, step) only, never from the batch."""
    digest = hashlib.blake2b(f"{seed}/{sample_index}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _is_greedy(row: SamplingRow) -> bool:
    return row.temperature < _GREEDY_EPS


def _has_penalty(row: SamplingRow) -> bool:
    return (
        row.repetition_penalty != 1.0 or row.presence_penalty != 0.0 or row.frequency_penalty != 0.0
    )


def _check_ids(ids: torch.Tensor, vocab: int, what: str) -> torch.Tensor:
    """`ids` (CPU, long), after refusing any outside the vocabulary."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise ValueError(f"{what} token id {bad} is outside the vocabulary [0, {vocab})")
    return ids


def _token_counts(
    seqs: list[list[int]], vocab: int, device: torch.device, what: str
) -> torch.Tensor:
    """How often each token occurs in each row's sequence: one scatter-add over all rows."""
    counts = torch.zeros(len(seqs), vocab, device=device)  # [rows, vocab]
    flat = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    if _check_ids(flat, vocab, what).numel() == 0:
        return counts
    row_of = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(s) for s in seqs]))
    counts.index_put_(
        (row_of.to(device), flat.to(device)),
        torch.ones(flat.numel(), device=device),
        accumulate=True,
    )
    return counts


class _Counts:
    """One sequence's output token counts (and prompt tokens, for the repetition penalty)."""

    __slots__ = ("output", "num_counted", "last", "prompt_seen")

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output  # [vocab] float32: occurrences of each token in the output so far
        self.num_counted = 0
        self.last = -1  # the last token counted: a key reused by another sequence is caught
        self.prompt_seen: torch.Tensor | None = None  # [vocab] bool, once

    def continues(self, ids: list[int], vocab: int, device: torch.device) -> bool:
        """Whether `ids` extends what was counted (the same sequence, one or more steps on)."""
        n = self.num_counted
        return (
            n > 0 and len(ids) >= n and ids[n - 1] == self.last
            and self.output.shape[0] == vocab and self.output.device == device
        )  # fmt: skip

    def add(self, ids: list[int], vocab: int) -> None:
        """Count the tokens after the ones already counted."""
        new = ids[self.num_counted :]
        if new:
            t = _check_ids(torch.tensor(new, dtype=torch.long), vocab, "output")
            self.output.index_add_(0, t.to(self.output.device), torch.ones(len(new),
                                   device=self.output.device))  # fmt: skip
            self.num_counted, self.last = len(ids), ids[-1]

    def prompt_seen_of(self, row: SamplingRow, vocab: int) -> torch.Tensor:
        if self.prompt_seen is None:
            seen = _token_counts([row.prompt_token_ids or []], vocab, self.output.device, "prompt")
            self.prompt_seen = seen[0] > 0
        return self.prompt_seen


class Sampler:
    """Turns one step's logits into tokens; seeded rows draw from their own per-step generator."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        # (seq_key, sample_index) → that sequence's penalty counts, kept from step to step
        self._counts: dict[tuple[str, int], _Counts] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        constraints: ConstraintBatch | None = None,
    ) -> StepOutput:
        """One token per row of `logits` [num_rows, vocab] (`constraints` first masks its rows to
        their grammars); logprobs come from the raw logits."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match {len(rows)} sampling rows"
            )
        n = len(rows)
        if n == 0:
            return StepOutput(token_ids=[], logprobs=[])
        logits = logits.float()
        greedy = [_is_greedy(r) for r in rows]
        wants_lp = any(r.num_logprobs is not None for r in rows)
        modifies = any(_has_penalty(r) or r.logit_bias or r.banned_token_ids for r in rows)
        if all(greedy) and not modifies and not wants_lp and constraints is None:
            # NOTE: fast path; ties go to the lowest index, like transformers
            return StepOutput(token_ids=argmax_free(logits).tolist(), logprobs=[None] * n)

        if constraints is not None and all(greedy) and not modifies:
            # NOTE: only grammar masks: the masked argmax writes no masked copy of the logits
            token_ids = constraints.argmax(logits)  # [n]
            logprobs = self._logprobs(logits, token_ids, rows) if wants_lp else [None] * n
            return StepOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

        work = logits
        if constraints is not None:
            work = constraints.apply(logits)  # a new tensor: logprobs read the raw one
        if modifies:
            if work is logits:
                work = logits.clone()  # keep the raw logits for logprobs
            self._apply_penalties(work, rows)
            self._apply_bias_and_bans(work, rows)
            if constraints is not None:
                self._unban_dead_ends(work, logits, constraints)

        device = logits.device
        greedy_idx = [i for i, g in enumerate(greedy) if g]
        sample_idx = [i for i, g in enumerate(greedy) if not g]
        if not sample_idx:
            token_ids = argmax_free(work)  # [n]
        elif not greedy_idx:
            token_ids = self._sample(work, rows)
        else:
            token_ids = torch.empty(n, dtype=torch.long, device=device)
            g = torch.tensor(greedy_idx, device=device)
            s = torch.tensor(sample_idx, device=device)
            token_ids[g] = argmax_free(work[g])
            token_ids[s] = self._sample(work[s], [rows[i] for i in sample_idx])

        logprobs = self._logprobs(logits, token_ids, rows) if wants_lp else [None] * n
        return StepOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    @staticmethod
    def _unban_dead_ends(
        work: torch.Tensor, logits: torch.Tensor, constraints: ConstraintBatch
    ) -> None:
        """A grammar row whose bans (min_tokens) forbid every allowed token keeps the grammar's."""
        rows_t = torch.tensor(constraints.rows, device=work.device)
        dead = torch.isneginf(work[rows_t].amax(dim=-1))  # [c]
        if bool(dead.any()):
            r = rows_t[dead]
            work[r] = constraints.apply(logits)[r]  # NOTE: rare: masks every row again

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """HF repetition penalty over prompt + output, then OpenAI presence/frequency on output."""
        idx = [i for i, r in enumerate(rows) if _has_penalty(r)]
        if not idx:
            return
        sub = [rows[i] for i in idx]
        vocab, device = logits.shape[1], logits.device
        rows_t = torch.tensor(idx, device=device)
        counts = self._sequence_counts(sub, vocab, device)
        out_counts = torch.stack([c.output for c in counts])  # [p, vocab]
        out_seen = out_counts > 0
        x = logits[rows_t]  # [p, vocab]
        rep = [r.repetition_penalty for r in sub]
        if any(v != 1.0 for v in rep):
            prompt_seen = torch.stack(
                [c.prompt_seen_of(r, vocab) for c, r in zip(counts, sub, strict=True)]
            )
            rep_t = torch.tensor(rep, device=device).unsqueeze(1)  # [p, 1]
            penalized = torch.where(x > 0, x / rep_t, x * rep_t)
            x = torch.where(prompt_seen | out_seen, penalized, x)
        freq = torch.tensor([r.frequency_penalty for r in sub], device=device).unsqueeze(1)
        pres = torch.tensor([r.presence_penalty for r in sub], device=device).unsqueeze(1)
        x = x - freq * out_counts - pres * out_seen.float()
        logits[rows_t] = x

    def _sequence_counts(
        self, rows: list[SamplingRow], vocab: int, device: torch.device
    ) -> list[_Counts]:
        """Each row's output token counts: its sequence's counts from the last step plus this
        step's new tokens (a row without seq_key, or whose sequence was not in the last step,
        or whose key now names another sequence, is counted from its whole list)."""
        kept: dict[tuple[str, int], _Counts] = {}
        out = []
        for r in rows:
            ids = r.output_token_ids or []
            key = None if r.seq_key is None else (r.seq_key, r.sample_index)
            c = self._counts.get(key) if key is not None else None
            if c is None or not c.continues(ids, vocab, device):
                c = _Counts(torch.zeros(vocab, device=device))  # [vocab]
            c.add(ids, vocab)
            if key is not None:
                kept[key] = c
            out.append(c)
        self._counts = kept  # NOTE: sequences absent from this step are dropped (bounded)
        return out

    def _apply_bias_and_bans(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Add logit_bias, then mask banned ids (EOS/stop ids before min_tokens) to -inf."""
        vocab, device = logits.shape[1], logits.device

        def index(r_idx: tuple[int, ...], c_idx: tuple[int, ...], what: str) -> tuple:
            cols = _check_ids(torch.tensor(c_idx, dtype=torch.long), vocab, what)
            return torch.tensor(r_idx, device=device), cols.to(device)

        items = [(r.logit_bias or {}).items() for r in rows]
        bias = [(i, int(t), float(b)) for i, kv in enumerate(items) for t, b in kv]
        if bias:
            r_idx, c_idx, vals = zip(*bias, strict=True)
            key = index(r_idx, c_idx, "logit_bias")
            logits.index_put_(key, torch.tensor(vals, device=device), accumulate=True)
        bans = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids or []]
        if bans:
            r_idx, c_idx = zip(*bans, strict=True)
            key = index(r_idx, c_idx, "banned")
            logits.index_put_(key, torch.tensor(float("-inf"), device=device))

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature → top-k → top-p → min-p → one inverse-CDF draw per row; returns [rows]."""
        n, vocab = logits.shape
        device = logits.device
        temps = torch.tensor([r.temperature for r in rows], device=device).unsqueeze(1)
        x = logits / temps  # [n, vocab], a new tensor: the caller's logits stay untouched
        top_k = [r.top_k if 0 < r.top_k < vocab else 0 for r in rows]
        top_p = [r.top_p for r in rows]
        cut = [j for j in range(n) if top_k[j] or top_p[j] < 1.0]
        if cut:
            x = self._top_k_top_p(x, cut, [top_k[j] for j in cut], [top_p[j] for j in cut])
        min_p = [r.min_p for r in rows]
        if any(m > 0.0 for m in min_p):
            probs = x.softmax(dim=-1)
            floor = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=device)[:, None]
            x = x.masked_fill(probs < floor, float("-inf"))
        probs = x.softmax(dim=-1)  # [n, vocab]
        return self._draw(probs, rows)

    def _top_k_top_p(
        self, x: torch.Tensor, idx: list[int], ks: list[int], ps: list[float]
    ) -> torch.Tensor:
        """Keep each row's top-k, then its smallest nucleus with mass >= top_p; rest to -inf.
        A few candidates are exact when the nucleus ends inside them; the rest get a full sort."""
        pending = [j for j, k in enumerate(ks) if k <= _MAX_TOPK]
        slow = [j for j, k in enumerate(ks) if k > _MAX_TOPK]
        for num_cand in _TOP_P_CANDIDATES:
            if not pending:
                break
            rows = [idx[j] for j in pending]
            pending = [
                pending[j]
                for j in self._candidate_top_k_top_p(
                    x, rows, [ks[j] for j in pending], [ps[j] for j in pending], num_cand
                )
            ]
        slow += pending
        if slow:
            rows_t = torch.tensor([idx[j] for j in slow], device=x.device)
            x[rows_t] = self._sort_top_k_top_p(
                x[rows_t], [ks[j] for j in slow], [ps[j] for j in slow]
            )
        return x

    @staticmethod
    def _candidate_top_k_top_p(
        x: torch.Tensor, rows: list[int], ks: list[int], ps: list[float], num_cand: int
    ) -> list[int]:
        """Filter `rows` of `x` in place from their best candidates; return the rows (positions in
        `rows`) whose nucleus may reach past the candidates and still need a wider look."""
        vocab, device = x.shape[1], x.device
        num_cand = min(vocab, max(ks + [num_cand if 0 in ks else 0]))
        rows_t = torch.tensor(rows, device=device)
        sub = x[rows_t]  # [r, vocab]
        vals, cand = sub.topk(num_cand, dim=-1)  # [r, num_cand] best first
        pos = torch.arange(num_cand, device=device)
        k_t = torch.tensor([k or num_cand for k in ks], device=device)
        vals = vals.masked_fill(pos[None, :] >= k_t[:, None], float("-inf"))
        p_t = torch.tensor(ps, device=device)[:, None]  # [r, 1]
        # rows with top_k: the candidates are the whole support; others: mass of the full row
        has_k = torch.tensor([k > 0 for k in ks], device=device)
        lse = torch.where(has_k, vals.logsumexp(dim=-1), sub.logsumexp(dim=-1))
        p_desc = (vals - lse[:, None]).exp()  # [r, num_cand]
        mass_before = p_desc.cumsum(dim=-1) - p_desc
        keep = (mass_before < p_t) | (pos[None, :] == 0) | (p_t >= 1.0)
        # NOTE: a row without top_k whose nucleus reaches the last candidate may be wider
        wide = ~has_k & keep[:, -1] & (p_t[:, 0] < 1.0) & (num_cand < vocab)  # [r]
        vals = vals.masked_fill(~keep, float("-inf"))
        out = torch.full_like(sub, float("-inf")).scatter_(1, cand, vals)
        wide_l = wide.tolist()
        if any(wide_l):
            x[rows_t[~wide]] = out[~wide]  # wide rows keep their logits for the next stage
        else:
            x[rows_t] = out
        return [j for j, w in enumerate(wide_l) if w]

    @staticmethod
    def _sort_top_k_top_p(x: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
        """vLLM's full-sort top-k/top-p: exact for any k and any nucleus width, but slower."""
        n, vocab = x.shape
        device = x.device
        sorted_x, order = x.sort(dim=-1)  # ascending  [n, vocab]
        pos = torch.arange(vocab, device=device)
        k_t = torch.tensor([k or vocab for k in ks], device=device)
        sorted_x = sorted_x.masked_fill(pos[None, :] < (vocab - k_t)[:, None], float("-inf"))
        p_t = torch.tensor(ps, device=device)
        mask = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - p_t)[:, None]
        mask[:, -1] = False  # always keep the best token
        sorted_x = sorted_x.masked_fill(mask, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)

    def _draw(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Inverse-CDF sampling with one uniform per row; seeded rows get their own generator."""
        n, vocab = probs.shape
        device = probs.device
        u = torch.empty(n, device=device)
        unseeded = [j for j, r in enumerate(rows) if r.seed is None]
        if len(unseeded) == n:
            u.uniform_(generator=self._generator(device))
        elif unseeded:
            u[torch.tensor(unseeded, device=device)] = torch.rand(
                len(unseeded), device=device, generator=self._generator(device)
            )
        for j, r in enumerate(rows):
            if r.seed is not None:
                g = torch.Generator(device=device).manual_seed(
                    row_seed(r.seed, r.sample_index, r.step)
                )
                u[j] = torch.rand(1, device=device, generator=g)[0]
        cdf = probs.cumsum(dim=-1)  # [n, vocab], non-decreasing
        target = (u * cdf[:, -1]).unsqueeze(1)  # [n, 1]
        # first index whose cdf exceeds the target: always a token with positive probability
        token_ids = torch.searchsorted(cdf, target, right=True).squeeze(1)
        over = token_ids >= vocab  # float rounding pushed the target onto the total
        if bool(over.any()):
            last = torch.where(probs > 0, torch.arange(vocab, device=device), -1).amax(dim=-1)
            token_ids = torch.where(over, last, token_ids)
        return token_ids

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow]
    ) -> list[TokenLogprob | None]:
        """log_softmax of the raw logits: the sampled token's logprob, its rank, and the top-N."""
        device = logits.device
        idx = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
        rows_t = torch.tensor(idx, device=device)
        lp = logits[rows_t].log_softmax(dim=-1)  # [m, vocab]
        chosen = lp.gather(1, token_ids[rows_t].unsqueeze(1))  # [m, 1]
        ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
        max_n = min(max(rows[i].num_logprobs or 0 for i in idx), lp.shape[1])
        top_v, top_i = lp.topk(max_n, dim=-1) if max_n else (lp[:, :0], lp[:, :0].long())
        top_v, top_i, chosen_l = top_v.tolist(), top_i.tolist(), chosen.squeeze(1).tolist()
        ids = token_ids[rows_t].tolist()
        out: list[TokenLogprob | None] = [None] * len(rows)
        for j, i in enumerate(idx):
            k = rows[i].num_logprobs or 0
            top = list(zip(top_i[j][:k], top_v[j][:k], strict=True))
            out[i] = TokenLogprob(token_id=ids[j], logprob=chosen_l[j], rank=ranks[j], top=top)
        return out


def prompt_logprobs(
    logits: torch.Tensor, target_ids: list[int], num_logprobs: int
) -> list[TokenLogprob]:
    """Each prompt position's logprob of the next prompt token (log_softmax of the raw logits),
    its rank and the top `num_logprobs`; `logits` [len(target_ids), vocab]."""
    lp = logits.float().log_softmax(dim=-1)  # [m, vocab]
    targets = torch.tensor(target_ids, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, targets.unsqueeze(1))  # [m, 1]
    ranks = ((lp > chosen).sum(dim=-1) + 1).tolist()
    k = min(num_logprobs, lp.shape[1])
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i, chosen_l = top_v.tolist(), top_i.tolist(), chosen.squeeze(1).tolist()
    return [
        TokenLogprob(t, chosen_l[j], ranks[j], list(zip(top_i[j], top_v[j], strict=True)))
        for j, t in enumerate(target_ids)
    ]
