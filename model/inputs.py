"""StepInput / StepOutput: the one contract between scheduler and model (and rank 0 and TP workers),
plain lists and ints: it pickles cheaply and no scheduler object crosses it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingRow:
    """Per-sequence sampler settings for one step; one row per sequence that samples this step."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None  # request seed; None: the engine-wide generator
    sample_index: int = 0  # which of the request's n samples (mixed into the seed)
    step: int = 0  # tokens this sequence generated so far (mixed into the seed: a pure function)
    num_logprobs: int | None = None  # None: none; 0: sampled token only; k: plus top k
    prompt_token_ids: list[int] | None = None  # only set when repetition_penalty != 1
    output_token_ids: list[int] | None = None  # only set when a penalty is on
    banned_token_ids: list[int] | None = None  # masked to -inf (EOS/stop ids before min_tokens)


@dataclass(slots=True)
class PromptLogprobRow:
    """Prompt positions of one sequence to score this step: each predicts the next prompt token."""

    seq_index: int  # index into query_lens
    offset: int  # first scored position's offset in the sequence's chunk of this step
    target_ids: list[int]  # [num_positions] the prompt token each scored position predicts
    num_logprobs: int  # top alternatives reported besides the target


@dataclass(slots=True)
class PoolingRow:
    """A pooling sequence's chunk: its hidden states pool into one vector instead of sampling."""

    seq_index: int  # index into query_lens
    pooling_type: str  # LAST | MEAN | CLS (model/pooler.py)
    is_first: bool  # the chunk starts at position 0
    is_last: bool  # the chunk ends the prompt


@dataclass(slots=True)
class StepInput:
    """Everything one forward + sample needs; sequences are laid out one after another."""

    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    slot_mapping: list[int]  # [num_tokens] block_id * block_size + offset of each token's K/V
    query_lens: list[int]  # [num_seqs] tokens scheduled for each sequence this step
    context_lens: list[int]  # [num_seqs] tokens in KV for each sequence after this step
    block_tables: list[list[int]]  # [num_seqs][num_blocks_of_seq]
    sample_indices: list[int]  # sequences (index into query_lens) whose last token samples
    sampling: list[SamplingRow] = field(default_factory=list)  # [len(sample_indices)]
    prompt_logprobs: list[PromptLogprobRow] = field(default_factory=list)
    pooling: list[PoolingRow] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of a sampled token under the raw model distribution, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the sampled token
    top: list[tuple[int, float]]  # [(token_id, logprob)] best first, length num_logprobs


@dataclass(slots=True)
class StepOutput:
    token_ids: list[int]  # [len(sample_indices)] sampled token per sampling row
    logprobs: list[TokenLogprob | None]  # [len(sample_indices)] None where the row asked none
    prompt_logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per prompt row
    # per pooling row (rank 0): LAST/CLS the token's hidden state ([] if not in this chunk),
    # MEAN the sum over the chunk's hidden states
    pooled: list[list[float]] = field(default_factory=list)
