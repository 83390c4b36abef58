"""RequestOutput: what the engine hands the server each step, per request (deltas, not totals)."""

from __future__ import annotations

from dataclasses import dataclass, field

from model.inputs import TokenLogprob


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's n samples: the text and tokens that are new since its previous output."""

    index: int
    text: str  # new text since the previous output (complete UTF-8, stop strings trimmed)
    token_ids: list[int]  # new token ids since the previous output
    logprobs: list[TokenLogprob] | None  # one per new token when the request asked for logprobs
    num_tokens: int  # tokens generated so far by this sample
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it


@dataclass(slots=True)
class RequestMetrics:
    """Monotonic timestamps (time.monotonic()) for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_draft_tokens: int = 0  # speculative tokens proposed for it, all samples (llama's draft_n)
    num_accepted_tokens: int = 0  # of them, accepted (draft_n_accepted)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # only the samples that changed this step
    finished: bool  # every sample of the request has finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    error: str | None = None  # set when the engine failed the request (finish_reason "error")
    # prompt_logprobs requests, with sample 0's first token: None for the first prompt token
    prompt_logprobs: list[TokenLogprob | None] | None = None
    embedding: list[float] | None = None  # a pooling request's one output

    @classmethod
    def failed(cls, request_id: str, error: str) -> RequestOutput:
        """The final output of a request the engine failed and holds nothing else of."""
        return cls(
            request_id, [], [CompletionOutput(0, "", [], None, 0, "error")], True, error=error
        )


@dataclass(slots=True)
class SchedulerStats:
    """A snapshot after each step, for /metrics and tests."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0  # 1 - free/total (cached-but-free blocks count as free)
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up
    prefix_cache_hits_total: int = 0  # prompt tokens found
    step_duration: float = 0.0  # seconds of the last step
    step_num_seqs: int = 0
    step_num_tokens: int = 0
    step_time_split: dict[str, float] = field(default_factory=dict)  # schedule/prepare/forward/...
    num_steps_total: int = 0  # steps that ran the model; per-step fields below belong to this one
    model_steps_total: dict[str, int] = field(default_factory=dict)  # by path: "fused_int8", ...
    prompt_tokens_total: int = 0  # prompt tokens of requests, counted at their first token
    generation_tokens_total: int = 0  # sampled tokens, all samples, counted every step
    step_inter_token_latencies: list[float] = field(default_factory=list)  # s, one per request
    spec_decode_num_drafts_total: int = 0  # sequences' verification steps with draft tokens
    spec_decode_num_draft_tokens_total: int = 0
    spec_decode_num_accepted_tokens_total: int = 0
    step_acceptance_lengths: list[int] = field(default_factory=list)  # 1 + accepted, per draft
