"""Grammar bitmasks applied to logits: bitmask.c on CPU, plain torch (the oracle) elsewhere.

A row is llguidance's [words] int32 (bit j % 32 of word j // 32 allows token j); the torch path
unpacks it (~1.9 ms at 16 rows of a 49k vocab), bitmask.c reads the words as they are. Tokens at
or past 32 * words (a padded LM head) are never allowed.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from model.layers import kernels


def _lib() -> ctypes.CDLL | None:
    return kernels.load()


def _usable(logits: torch.Tensor, bitmask: torch.Tensor) -> bool:
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.is_contiguous()
        and bitmask.dtype == torch.int32
        and bitmask.is_contiguous()
        and _lib() is not None
    )


def allowed_mask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Bool [rows, vocab] of the tokens each bitmask row allows (the reference's unpacking)."""
    # NOTE: one numpy call, not a chain of small torch ops (each an OpenMP region)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits[:, :vocab]).view(torch.bool)  # [rows, <=vocab]
    if allowed.shape[1] < vocab:  # a padded LM head: the padding is never allowed
        pad = torch.zeros(allowed.shape[0], vocab - allowed.shape[1], dtype=torch.bool)
        allowed = torch.cat([allowed, pad], dim=1)
    return allowed.to(device)


def apply_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The reference for `apply`: unpack, then torch.where."""
    allowed = allowed_mask(bitmask, logits.shape[1], logits.device)  # [len(rows), vocab]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        return torch.where(allowed, logits, neg_inf)
    rows_t = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[rows_t] = torch.where(allowed, logits[rows_t], neg_inf)
    return out


def argmax_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The reference for `argmax`: the greedy token of every row of the masked logits."""
    return apply_torch(logits, bitmask, rows).argmax(dim=-1)


def _check(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    if bitmask.dim() != 2 or bitmask.shape[0] != len(rows) or not rows:
        raise ValueError(f"a bitmask of shape {tuple(bitmask.shape)} for {len(rows)} rows")
    if min(rows) < 0 or max(rows) >= logits.shape[0]:
        raise ValueError(f"bitmask rows {rows} outside the {logits.shape[0]} rows of the logits")


def apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`logits` [n, vocab] with row rows[r]'s tokens that bitmask row r forbids at -inf; a new
    tensor (the raw logits stay for logprobs)."""
    _check(logits, bitmask, rows)
    if not _usable(logits, bitmask):
        return apply_torch(logits, bitmask, rows)
    n, vocab = logits.shape
    out = torch.empty_like(logits) if len(rows) == n else logits.clone()  # [n, vocab]
    rows_t = torch.tensor(rows, dtype=torch.int64)
    _lib().bitmask_apply(
        logits.data_ptr(), out.data_ptr(), logits.stride(0), vocab, bitmask.data_ptr(),
        bitmask.shape[1], rows_t.data_ptr(), len(rows), torch.get_num_threads(),
    )  # fmt: skip
    return out


def argmax_rows(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The greedy token [len(rows)] of row rows[r] of `logits` under bitmask row r; no masked
    copy of the logits is written."""
    _check(logits, bitmask, rows)
    rows_t = torch.tensor(rows, dtype=torch.int64)
    if not _usable(logits, bitmask):
        return apply_torch(logits, bitmask, rows)[rows_t.to(logits.device)].argmax(dim=-1)
    out = torch.empty(len(rows), dtype=torch.int64)  # [len(rows)]
    _lib().bitmask_argmax(
        logits.data_ptr(), logits.stride(0), logits.shape[1], bitmask.data_ptr(),
        bitmask.shape[1], rows_t.data_ptr(), len(rows), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def argmax_free(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) [n] (the first best, a NaN first): numpy's on CPU, which took
    8 us a row of SmolLM2's 49k logits here, against 120 us for torch's and 60 us for bitmask.c's
    masked loop (1.2 vs 4.7 ms for 64 rows against torch's)."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.numpy().argmax(axis=-1))  # [n] int64


def argmax(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The greedy token [n] of every row of `logits`: rows[r] under bitmask row r, the others
    free."""
    out = argmax_rows(logits, bitmask, rows)
    n = logits.shape[0]
    if rows == list(range(n)):
        return out
    token_ids = argmax_free(logits)  # [n]
    token_ids[torch.tensor(rows, device=logits.device)] = out.to(logits.device)
    return token_ids
