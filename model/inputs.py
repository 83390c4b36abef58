"""StepInput / StepOutput: the one contract between scheduler and model (and rank 0 and TP workers),
plain lists and ints (no scheduler object crosses it), sent between hosts in a fixed binary
schema (encode_step / decode_step), never pickled."""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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
    # with sample_index, names the sequence across steps, so the sampler keeps its penalty
    # counts and adds only new tokens; None: counted from the lists every step
    seq_key: str | None = None


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
    sampling: list[SamplingRow] = field(default_factory=list)  # [num_sample_rows]
    prompt_logprobs: list[PromptLogprobRow] = field(default_factory=list)
    pooling: list[PoolingRow] = field(default_factory=list)
    # [len(sample_indices)] how many of each sampling sequence's last tokens sample: 1 + its draft
    # tokens when it speculates (every row is verified in this one step); []: one each
    num_sampled: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_sample_rows(self) -> int:
        return sum(self.num_sampled) if self.num_sampled else len(self.sample_indices)

    def sample_rows(self) -> list[int]:
        """The token rows whose logits sample, in sampling-row order (a sequence's adjacent)."""
        ends = list(itertools.accumulate(self.query_lens))
        if not self.num_sampled:
            return [ends[i] - 1 for i in self.sample_indices]
        return [
            r
            for i, n in zip(self.sample_indices, self.num_sampled, strict=True)
            for r in range(ends[i] - n, ends[i])
        ]


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of a sampled token under the raw model distribution, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the sampled token
    top: list[tuple[int, float]]  # [(token_id, logprob)] best first, length num_logprobs


@dataclass(slots=True)
class StepOutput:
    token_ids: list[int]  # [num_sample_rows] sampled token per sampling row
    logprobs: list[TokenLogprob | None]  # [num_sample_rows] None where the row asked none
    prompt_logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per prompt row
    # per pooling row (rank 0): LAST/CLS the token's hidden state ([] if not in this chunk),
    # MEAN the sum over the chunk's hidden states
    pooled: list[list[float]] = field(default_factory=list)


# ── the wire form of a step (rank 0 → the other ranks): fixed schema, no pickle ──────────────
# magic, then the counts (num_tokens, num_seqs, block ids in all tables, sample_indices, prompt
# logprob rows, their target ids, pooling rows, num_sampled (0 or sample_indices), bytes of the
# sampling rows' JSON), then int64 arrays in a fixed order, then the JSON.
STEP_MAGIC = b"TMS3"
_HEADER = struct.Struct("<4s9Q")
POOLING_TYPES = ("LAST", "MEAN", "CLS")  # by their wire code; model/pooler.py takes these
MAX_STEP_BYTES = 1 << 30  # a step larger than this is refused before anything is allocated
_INT_FIELDS = ("top_k", "sample_index", "step")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")  # fmt: skip
_OPTIONAL_INT = ("seed", "num_logprobs")
_OPTIONAL_IDS = ("prompt_token_ids", "output_token_ids", "banned_token_ids")
_INT64 = np.dtype("<i8")


def encode_step(step: StepInput) -> bytes:
    """The step as bytes of a fixed schema: int64 arrays and the sampling rows as JSON."""
    tables, plps = step.block_tables, step.prompt_logprobs
    rows = json.dumps([_row_to_json(r) for r in step.sampling], separators=(",", ":")).encode()
    targets = sum(len(r.target_ids) for r in plps)
    head = _HEADER.pack(STEP_MAGIC, step.num_tokens, step.num_seqs, sum(map(len, tables)),
                        len(step.sample_indices), len(plps), targets, len(step.pooling),
                        len(step.num_sampled), len(rows))  # fmt: skip
    ints = [*step.input_ids, *step.positions, *step.slot_mapping, *step.query_lens,
            *step.context_lens, *map(len, tables), *itertools.chain.from_iterable(tables),
            *step.sample_indices]  # fmt: skip
    for r in plps:
        ints += [r.seq_index, r.offset, r.num_logprobs, len(r.target_ids)]
    ints += itertools.chain.from_iterable(r.target_ids for r in plps)
    for r in step.pooling:
        ints += [r.seq_index, POOLING_TYPES.index(r.pooling_type), r.is_first, r.is_last]
    ints += step.num_sampled
    return head + np.asarray(ints, dtype=_INT64).tobytes() + rows


def decode_step(payload: bytes) -> StepInput:
    """encode_step's inverse; any payload that is not one raises ValueError (sizes are checked
    against the payload's length before anything is allocated, types are fixed)."""
    if len(payload) > MAX_STEP_BYTES:
        raise ValueError(f"step payload of {len(payload)} bytes > {MAX_STEP_BYTES}")
    if len(payload) < _HEADER.size:
        raise ValueError(f"step payload of {len(payload)} bytes < its {_HEADER.size}-byte header")
    (magic, num_tokens, num_seqs, num_ids, num_samples, num_plp, num_targets, num_pool,
     num_counts, json_len) = _HEADER.unpack_from(payload)  # fmt: skip
    if magic != STEP_MAGIC:
        raise ValueError(f"step payload starts with {magic!r}, not {STEP_MAGIC!r}")
    if num_counts not in (0, num_samples):
        raise ValueError(f"step has {num_counts} num_sampled for {num_samples} sample_indices")
    counts = (num_tokens,) * 3 + (num_seqs,) * 3 + (num_ids, num_samples)
    counts += (4 * num_plp, num_targets, 4 * num_pool, num_counts)
    num_ints = sum(counts)
    want = _HEADER.size + 8 * num_ints + json_len
    if want != len(payload):
        raise ValueError(f"step payload has {len(payload)} bytes, its header says {want}")
    ints = np.frombuffer(payload, dtype=_INT64, count=num_ints, offset=_HEADER.size)
    parts, at = [], 0
    for n in counts:
        parts.append(ints[at : at + n])
        at += n
    ids, pos, slots, query_lens, context_lens, table_lens, block_ids, samples = parts[:8]
    prompt_rows = _prompt_rows(parts[8], parts[9], num_seqs)
    pooling = _pooling_rows(parts[10], num_seqs)
    if (table_lens < 0).any() or sum(table_lens.tolist()) != num_ids:  # NOTE: no int64 wrap
        raise ValueError(f"step block table lengths do not sum to its {num_ids} block ids")
    if ((samples < 0) | (samples >= num_seqs)).any():
        raise ValueError(f"step sample_indices out of [0, {num_seqs})")
    num_sampled = parts[11]
    if num_counts and ((num_sampled < 1) | (num_sampled > query_lens[samples])).any():
        raise ValueError("step num_sampled out of [1, the sequence's query_len]")
    num_rows = int(num_sampled.sum()) if num_counts else num_samples
    bounds = np.concatenate(([0], np.cumsum(table_lens))).tolist()
    flat = block_ids.tolist()
    try:
        rows = json.loads(payload[len(payload) - json_len :].decode())
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
        raise ValueError(f"step sampling rows are not JSON: {e}") from None
    if not isinstance(rows, list) or len(rows) not in (0, num_rows):
        raise ValueError(f"step sampling rows are not a list of 0 or {num_rows} rows")
    return StepInput(
        input_ids=ids.tolist(),
        positions=pos.tolist(),
        slot_mapping=slots.tolist(),
        query_lens=query_lens.tolist(),
        context_lens=context_lens.tolist(),
        block_tables=[flat[a:b] for a, b in itertools.pairwise(bounds)],
        sample_indices=samples.tolist(),
        sampling=[_row_from_json(r) for r in rows],
        prompt_logprobs=prompt_rows,
        pooling=pooling,
        num_sampled=num_sampled.tolist(),
    )


def _prompt_rows(heads: np.ndarray, targets: np.ndarray, num_seqs: int) -> list[PromptLogprobRow]:
    """(seq_index, offset, num_logprobs, n_targets) per row, then every row's targets."""
    heads = heads.reshape(-1, 4).tolist()
    if sum(h[3] for h in heads) != len(targets) or any(
        not 0 <= h[0] < num_seqs or min(h[1:]) < 0 for h in heads
    ):
        raise ValueError(f"step prompt logprob rows do not fit {num_seqs} sequences and targets")
    flat, rows, at = targets.tolist(), [], 0
    for seq, offset, num, n in heads:
        rows.append(PromptLogprobRow(seq, offset, flat[at : at + n], num))
        at += n
    return rows


def _pooling_rows(ints: np.ndarray, num_seqs: int) -> list[PoolingRow]:
    """(seq_index, pooling type code, is_first, is_last) per row."""
    rows = []
    for seq, kind, first, last in ints.reshape(-1, 4).tolist():
        if not 0 <= seq < num_seqs or not 0 <= kind < len(POOLING_TYPES) or {first, last} - {0, 1}:
            raise ValueError(f"step pooling row ({seq}, {kind}, {first}, {last}) is malformed")
        rows.append(PoolingRow(seq, POOLING_TYPES[kind], bool(first), bool(last)))
    return rows


def _row_to_json(row: SamplingRow) -> dict[str, Any]:
    fields = (*_INT_FIELDS, *_FLOAT_FIELDS, *_OPTIONAL_INT, *_OPTIONAL_IDS)
    out = {f: getattr(row, f) for f in fields}
    bias = row.logit_bias
    out["logit_bias"] = None if bias is None else [[int(k), float(v)] for k, v in bias.items()]
    out["seq_key"] = row.seq_key
    return out


def _int(value: Any, what: str) -> int:
    if type(value) is not int:
        raise ValueError(f"sampling row field {what} is {type(value).__name__}, not int")
    return value


def _float(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"sampling row field {what} is {type(value).__name__}, not a number")
    return float(value)


def _ids(value: Any, what: str) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"sampling row field {what} is {type(value).__name__}, not a list")
    return [_int(v, what) for v in value]


def _row_from_json(obj: Any) -> SamplingRow:
    """One sampling row, every field's type checked; unknown or missing fields raise."""
    names = {*_INT_FIELDS, *_FLOAT_FIELDS, *_OPTIONAL_INT, *_OPTIONAL_IDS, "logit_bias", "seq_key"}
    if not isinstance(obj, dict) or set(obj) != names:
        raise ValueError(
            f"a sampling row must be an object with exactly the fields {sorted(names)}"
        )
    row = SamplingRow(
        **{f: _int(obj[f], f) for f in _INT_FIELDS},
        **{f: _float(obj[f], f) for f in _FLOAT_FIELDS},
        **{f: None if obj[f] is None else _int(obj[f], f) for f in _OPTIONAL_INT},
        **{f: None if obj[f] is None else _ids(obj[f], f) for f in _OPTIONAL_IDS},
    )
    if obj["seq_key"] is not None and not isinstance(obj["seq_key"], str):
        raise ValueError(f"sampling row field seq_key is {type(obj['seq_key']).__name__}, not str")
    row.seq_key = obj["seq_key"]
    bias = obj["logit_bias"]
    if bias is not None:
        if not isinstance(bias, list) or not all(isinstance(p, list) and len(p) == 2 for p in bias):
            raise ValueError("sampling row field logit_bias is not a list of [token id, bias]")
        row.logit_bias = {_int(k, "logit_bias"): _float(v, "logit_bias") for k, v in bias}
    return row
