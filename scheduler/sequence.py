"""Sequence: one of a request's n samples as the scheduler sees it (tokens, KV blocks, status)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from model.pooler import PoolerConfig
from model.sampling_params import SamplingParams
from scheduler.outputs import RequestMetrics


class SequenceStatus(enum.IntEnum):
    """Ordered so that `status > PREEMPTED` means finished (vLLM's RequestStatus trick)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > SequenceStatus.PREEMPTED


FINISH_REASONS: dict[SequenceStatus, str] = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt + generated tokens of one sample; `num_computed_tokens` catches up to `num_tokens`."""

    # NOTE: a preempted sequence recomputes all of token_ids; num_prompt_tokens stays the prompt's

    request_id: str
    token_ids: list[int]  # prompt + output
    params: SamplingParams = field(default_factory=SamplingParams)
    sample_index: int = 0
    max_tokens: int | None = None  # effective max_tokens (params.max_tokens resolved); None: no cap
    num_prompt_tokens: int = -1  # -1: len(token_ids) at construction
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained sha256 of each full block
    num_hashed_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    leader: Sequence | None = None  # sample 0 of the request, for samples 1..n-1 (shares blocks)
    detokenizer: Any = None  # model.detokenizer.IncrementalDetokenizer, set by the engine
    matcher: Any = None  # model.constraints.Matcher when decoding is constrained (rank 0 state)
    metrics: RequestMetrics | None = None
    output_logprobs: list[Any] = field(default_factory=list)  # TokenLogprob per output token
    num_logprobs_reported: int = 0  # output_logprobs already sent (their text was returned)
    prompt_logprobs: list[Any] = field(default_factory=list)  # TokenLogprob of prompt tokens 1..
    pooler: PoolerConfig | None = None  # set: a pooling sequence (prefill only, no sampling)
    pooled: list[float] | None = None  # the pooled value so far (MEAN: a sum), then the embedding
    draft_token_ids: list[int] = field(default_factory=list)  # verified in this step after its last
    draft_state: Any = None  # scheduler.spec_decode.DraftState once it speculates

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Sample 0 of a request with prompt_logprobs scores its prompt (the others share it)."""
        return self.params.prompt_logprobs is not None and self.sample_index == 0

    @property
    def needs_every_position(self) -> bool:
        """Its prompt positions' outputs are read: a prefix-cache hit would skip them."""
        return self.wants_prompt_logprobs or (
            self.pooler is not None and self.pooler.needs_every_position
        )

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI finish_reason of the status; None while the sequence still runs."""
        return FINISH_REASONS.get(self.status)
