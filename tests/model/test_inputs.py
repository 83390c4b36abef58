"""The step's wire form: a fixed schema that round-trips exactly, and any other bytes (truncated,
oversized counts, wrong types, fuzz) are a ValueError before anything large is allocated."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.inputs import (
    MAX_STEP_BYTES,
    SamplingRow,
    StepInput,
    _row_to_json,
    decode_step,
    encode_step,
)

HEADER = struct.Struct("<4s9Q")


def a_step(sampling: list[SamplingRow] | None = None) -> StepInput:
    return StepInput(
        input_ids=[5, 6, 7, 9],
        positions=[0, 1, 2, 40],
        slot_mapping=[16, 17, 18, 72],
        query_lens=[3, 1],
        context_lens=[3, 41],
        block_tables=[[1], [2, 3, 4]],
        sample_indices=[0, 1],
        sampling=sampling or [],
    )


def rows() -> list[SamplingRow]:
    return [
        SamplingRow(),
        SamplingRow(
            temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, presence_penalty=0.5,
            frequency_penalty=-0.25, repetition_penalty=1.1, logit_bias={3: -100.0, 11: 2.5},
            seed=1234, sample_index=2, step=7, num_logprobs=3, prompt_token_ids=[5, 6, 7],
            output_token_ids=[8], banned_token_ids=[0, 2], seq_key="cmpl-1",
        ),
    ]  # fmt: skip


@pytest.mark.timeout(10)
def test_round_trip_is_exact() -> None:
    for step in (a_step(), a_step(rows())):
        assert decode_step(encode_step(step)) == step


@pytest.mark.timeout(10)
def test_header_counts_and_layout() -> None:
    payload = encode_step(a_step())
    assert HEADER.unpack_from(payload) == (b"TMS3", 4, 2, 4, 2, 0, 0, 0, 0, 2)
    assert len(payload) == HEADER.size + 8 * (3 * 4 + 3 * 2 + 4 + 2) + len(b"[]")


def with_header(payload: bytes, **counts: int) -> bytes:
    names = ("num_tokens", "num_seqs", "num_ids", "num_samples", "num_prompt_rows",
             "num_targets", "num_pool_rows", "num_counts", "json_len")  # fmt: skip
    values = dict(zip(names, HEADER.unpack_from(payload)[1:], strict=True)) | counts
    return HEADER.pack(b"TMS3", *values.values()) + payload[HEADER.size :]


@pytest.mark.timeout(30)  # one case builds a 1 GiB payload: seconds on a loaded 2-core host
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p[:10], "step payload of 10 bytes < its 76-byte header"),
        (lambda p: b"XXXX" + p[4:], "step payload starts with b'XXXX', not b'TMS3'"),
        (lambda p: with_header(p, num_tokens=2**60), "its header says"),
        (lambda p: with_header(p, json_len=2**64 - 1), "its header says"),
        (lambda p: p + b"x", "step payload has 271 bytes, its header says 270"),
        (lambda p: b"TMS3" + b"\x00" * (MAX_STEP_BYTES - 3), f"bytes > {MAX_STEP_BYTES}"),
    ],
)
def test_malformed_payloads_raise_value_error(mutate, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        decode_step(mutate(encode_step(a_step())))


def replace_rows(step: StepInput, new_rows: list) -> bytes:
    payload = encode_step(step)
    old = len(json.dumps([_row_to_json(r) for r in step.sampling], separators=(",", ":")))
    body = json.dumps(new_rows).encode()
    return with_header(payload[: len(payload) - old] + body, json_len=len(body))


@pytest.mark.timeout(10)
def test_sampling_rows_have_fixed_types() -> None:
    good = [_row_to_json(r) for r in rows()]
    assert decode_step(replace_rows(a_step(rows()), good)).sampling == rows()
    cases = [
        ({**good[0], "top_k": "5"}, "sampling row field top_k is str, not int"),
        ({**good[0], "seed": True}, "sampling row field seed is bool, not int"),
        ({**good[0], "temperature": [1]}, "sampling row field temperature is list, not a number"),
        ({**good[0], "banned_token_ids": [1.5]}, "banned_token_ids is float, not int"),
        ({**good[0], "logit_bias": {"3": 1.0}}, "logit_bias is not a list of"),
        ({**good[0], "__reduce__": 1}, "exactly the fields"),
        ({k: v for k, v in good[0].items() if k != "seed"}, "exactly the fields"),
    ]
    for row, message in cases:
        with pytest.raises(ValueError, match=message):
            decode_step(replace_rows(a_step(rows()), [row, good[1]]))
    with pytest.raises(ValueError, match="not a list of 0 or 2 rows"):
        decode_step(replace_rows(a_step(rows()), [good[0]]))


@pytest.mark.timeout(10)
def test_block_tables_and_sample_indices_are_checked() -> None:
    payload = bytearray(encode_step(a_step()))
    lens_at = HEADER.size + 8 * (3 * 4 + 2 * 2)  # the block table lengths
    struct.pack_into("<q", payload, lens_at, -1)
    with pytest.raises(ValueError, match="block table lengths do not sum to its 4 block ids"):
        decode_step(bytes(payload))
    payload = bytearray(encode_step(a_step()))
    struct.pack_into("<q", payload, HEADER.size + 8 * (3 * 4 + 3 * 2 + 4), 2)
    with pytest.raises(ValueError, match=r"step sample_indices out of \[0, 2\)"):
        decode_step(bytes(payload))


@pytest.mark.timeout(30)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=400) | st.builds(lambda b: encode_step(a_step(rows()))[:60] + b,
                                           st.binary(max_size=400)))  # fmt: skip
def test_any_bytes_decode_or_raise_value_error(data: bytes) -> None:
    try:
        step = decode_step(data)
    except ValueError:
        return
    assert isinstance(step, StepInput)


@pytest.mark.timeout(10)
def test_prompt_logprob_and_pooling_rows_travel() -> None:
    """Every rank joins the prompt-logprob gathers, so their rows reach the workers too."""
    from model.inputs import PoolingRow, PromptLogprobRow

    step = a_step()
    step.prompt_logprobs = [PromptLogprobRow(0, 1, [5, 6], 3), PromptLogprobRow(1, 0, [], 0)]
    step.pooling = [PoolingRow(1, "MEAN", True, False)]
    assert decode_step(encode_step(step)) == step
    step.pooling = [PoolingRow(5, "LAST", True, True)]  # a sequence the step does not have
    with pytest.raises(ValueError, match="pooling row"):
        decode_step(encode_step(step))


@pytest.mark.timeout(10)
def test_num_sampled_travels_and_is_checked() -> None:
    """A speculating sequence samples 1 + its draft tokens: its last rows, in order."""
    step = a_step([SamplingRow(), SamplingRow(step=1), SamplingRow()])
    step.num_sampled = [2, 1]  # sequence 0 verifies one draft token, sequence 1 decodes
    assert step.num_sample_rows == 3 and step.sample_rows() == [1, 2, 3]
    assert a_step().sample_rows() == [2, 3]
    payload = encode_step(step)
    assert HEADER.unpack_from(payload)[8] == 2
    assert decode_step(payload) == step
    step.num_sampled = [4, 1]  # more rows than sequence 0's 3 query tokens
    with pytest.raises(ValueError, match="num_sampled out of"):
        decode_step(encode_step(step))
    step.num_sampled = [1, 1]  # 2 rows, but 3 sampling rows
    with pytest.raises(ValueError, match="not a list of 0 or 2 rows"):
        decode_step(encode_step(step))
