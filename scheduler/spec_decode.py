"""Speculative decoding: vLLM's --speculative-config, the n-gram (prompt lookup) proposer, and
how many draft tokens a sequence gets (it shrinks where drafts are rejected)."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from model.inputs import SamplingRow, StepInput

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.runner import ModelRunner
    from scheduler.sequence import Sequence

METHODS = ("ngram", "draft_model")
# NOTE: a CPU step is compute-bound from a few rows on: past this many rows in a step no sequence
# drafts (a rejected draft row then costs about what a decode row does)
SPEC_MAX_ROWS = {"cuda": 256, "cpu": 8}
# a sequence whose draft was wholly rejected skips this many steps before it drafts again (doubled
# on each further miss up to MAX_BACKOFF): free-form text stops paying for verification rows
MIN_BACKOFF, MAX_BACKOFF = 1, 16
# the gate (SpecGate): steps of each kind before comparing, the speed drafting must keep, and
# how long drafting pauses when it does not
GATE_MIN_STEPS, GATE_MIN_GAIN, GATE_PAUSE_STEPS = 8, 1.0, 128


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config JSON: method, num_speculative_tokens and the n-gram sizes."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_max: int = 5  # longest suffix matched (vLLM: 5 when neither is given)
    prompt_lookup_min: int = 5  # shortest
    model: str | None = None  # draft_model: a small model with the target's tokenizer

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """Validate the JSON's keys and values (vLLM's defaults for the n-gram sizes)."""
        d = dict(d)
        model = d.pop("model", None)
        method = d.pop("method", "draft_model" if model is not None else None)
        if (method == "draft_model") != (model is not None) or not isinstance(model, str | None):
            raise ValueError(
                f"speculative_config method {method!r} with model {model!r}: draft_model needs a "
                "model path, ngram none"
            )
        if method not in METHODS:
            raise ValueError(
                f"speculative_config method {method!r} is not supported: use one of {METHODS}"
            )
        k = d.pop("num_speculative_tokens", None)
        if type(k) is not int or not 1 <= k <= 32:
            raise ValueError(f"speculative_config num_speculative_tokens must be 1..32, got {k!r}")
        lo, hi = d.pop("prompt_lookup_min", None), d.pop("prompt_lookup_max", None)
        lo, hi = lo if lo is not None else hi or 5, hi if hi is not None else lo or 5
        if type(lo) is not int or type(hi) is not int or not 1 <= lo <= hi:
            raise ValueError(
                f"speculative_config needs 1 <= prompt_lookup_min ({lo!r}) <= prompt_lookup_max "
                f"({hi!r})"
            )
        if d:
            raise ValueError(f"speculative_config has unknown keys {sorted(d)}")
        return cls(method, k, hi, lo, model)


def _rfind(hay: bytes, needle: bytes, end: int) -> int:
    """Last token-aligned occurrence of `needle` ending before byte `end` (4 bytes a token)."""
    while end >= len(needle):
        at = hay.rfind(needle, 0, end)
        if at < 0 or at % 4 == 0:
            return at
        end = at + len(needle) - 1
    return -1


def propose_ngram(token_ids: list[int], k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    (lookup_max down to lookup_min tokens) of `token_ids`; [] when no suffix recurs."""
    n_tokens = len(token_ids)
    if k < 1 or n_tokens < lookup_min + 1:
        return []
    hay = array("i", token_ids).tobytes()  # NOTE: bytes.rfind searches in C, aligned below
    for n in range(min(lookup_max, n_tokens - 1), lookup_min - 1, -1):
        at = _rfind(hay, hay[4 * (n_tokens - n) :], 4 * (n_tokens - 1))
        if at >= 0:
            start = at // 4 + n
            return token_ids[start : start + k]
    return []


class DraftModel:
    """vLLM's draft_model method: a small model with the target's tokenizer drafts greedily (a
    point mass: verification stays exact). Its KV cache is indexed by the same block ids as the
    target's: it runs every step the target runs, so cached and shared blocks hold both."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @classmethod
    def load(cls, path: str, runner_kwargs: dict[str, Any], target: ModelConfig) -> DraftModel:
        """Its runner on this process (one rank) with the target's settings; the vocabularies
        must match (the same tokenizer)."""
        from model.runner import ModelRunner

        runner = ModelRunner(path, **runner_kwargs)
        if runner.model_config.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft model {path} has {runner.model_config.vocab_size} tokens, the target "
                f"{target.vocab_size}: it must share the target's tokenizer"
            )
        return cls(runner)

    def run_step(self, step: StepInput) -> None:
        """Write the draft's K/V for every token the target computes in `step` (no sampling)."""
        self.runner.compute_logits(
            replace(step, sample_indices=[], sampling=[], num_sampled=[], prompt_logprobs=[],
                    pooling=[])
        )  # fmt: skip

    def propose(self, seq: Sequence, k: int, block_size: int) -> list[int]:
        """k greedy tokens after the sequence's tokens, one draft forward each, written at its
        slots from its pending last token on (the block table covers them)."""
        table = [max(b, 0) for b in seq.block_table]
        token, pos, out = seq.token_ids[-1], seq.num_tokens - 1, []
        for _ in range(k):
            slot = table[pos // block_size] * block_size + pos % block_size
            step = StepInput([token], [pos], [slot], [1], [pos + 1], [table], [0], [SamplingRow()])
            token = int(self.runner.compute_logits(step)[0].argmax())
            out.append(token)
            pos += 1
        return out


@dataclass(slots=True)
class DraftState:
    """One sequence's speculation: its draft length now, and how long it sits out after misses."""

    k: int
    skip: int = 0  # steps left without drafting
    backoff: int = MIN_BACKOFF  # steps the next total miss sits out

    def observe(self, num_draft: int, num_accepted: int, k_max: int) -> None:
        """Grow k by one after a fully accepted draft, shrink it to what was accepted + 1 after
        a partial one, sit out a while after a total miss."""
        if num_accepted == num_draft:
            self.k, self.backoff = min(k_max, self.k + 1), MIN_BACKOFF
        elif num_accepted:
            self.k, self.backoff = max(1, num_accepted + 1), MIN_BACKOFF
        else:
            self.k = max(1, self.k // 2)
            self.skip, self.backoff = self.backoff, min(MAX_BACKOFF, 2 * self.backoff)


@dataclass(slots=True)
class SpecGate:
    """Pauses all drafting while decode steps with drafts yield fewer tokens per second than
    steps without (a verification row can cost more than it saves: a slower kernel path, a
    compute-bound batch), then measures again."""

    plain: float = 0.0  # tokens/s of decode steps without drafts (moving average)
    spec: float = 0.0  # of decode steps with drafts
    num_plain: int = 0
    num_spec: int = 0
    pause: int = 0  # steps left without drafts

    def allows(self) -> bool:
        """Whether this step may draft (called once a step)."""
        if self.pause:
            self.pause -= 1
            return False
        return True

    def observe(self, drafted: bool, tokens: int, seconds: float) -> None:
        """One decode-only step: the tokens it gained and how long it took."""
        if seconds <= 0.0 or tokens <= 0:
            return
        rate = tokens / seconds
        if drafted:
            self.spec = rate if not self.num_spec else 0.8 * self.spec + 0.2 * rate
            self.num_spec += 1
        else:
            self.plain = rate if not self.num_plain else 0.8 * self.plain + 0.2 * rate
            self.num_plain += 1
        enough = min(self.num_spec, self.num_plain) >= GATE_MIN_STEPS
        if enough and self.spec < GATE_MIN_GAIN * self.plain:
            self.pause, self.num_spec = GATE_PAUSE_STEPS, 0


@dataclass(slots=True)
class SpecStats:
    """Running totals, named as vLLM's spec_decode counters."""

    num_drafts: int = 0  # verification steps of a sequence with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def add(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
