"""bitmask.c (grammar masks on logits) against the plain-torch unpack-and-where, its oracle."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from model import bitmask as masks

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: grammar masks use the torch path")
    lib = masks._lib()
    assert lib is not None, "a C compiler is present but bitmask.c did not build or load"
    return lib


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _pack(allowed: np.ndarray) -> torch.Tensor:
    """Bool [rows, 32 * words] → llguidance's int32 words (bit j % 32 of word j // 32)."""
    return torch.from_numpy(np.packbits(allowed, axis=1, bitorder="little").view("<i4").copy())


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize(
    "num_rows,rows,vocab,words",
    [
        (1, [0], 49152, 1536),  # SmolLM2
        (16, list(range(16)), 49152, 1536),
        (4, [1, 3], 1003, 32),  # vocab not a multiple of 32: bits past it are ignored
        (3, [2, 0], 1056, 32),  # a padded LM head: columns past 32 * words never allowed
        (2, [0, 1], 45, 2),
        (5, [4], 31, 1),
    ],
)
@pytest.mark.parametrize("density", [0.0, 0.002, 0.5, 0.97, 1.0])
def test_matches_torch(kernel, threads, num_rows, rows, vocab, words, density) -> None:
    g = np.random.default_rng(num_rows * 7919 + vocab + int(density * 1000))
    logits = torch.from_numpy(g.standard_normal((num_rows, vocab), dtype=np.float32))
    allowed = g.random((len(rows), 32 * words)) < density
    allowed[:, 32:64] = density > 0.9  # whole words set (or clear) take their own branch
    allowed[:, 1] |= density > 0.0
    bitmask = _pack(allowed)
    raw = logits.clone()
    fast = masks.apply(logits, bitmask, rows)
    assert torch.equal(fast, masks.apply_torch(logits, bitmask, rows))
    greedy = masks.argmax(logits, bitmask, rows)
    assert torch.equal(greedy, masks.argmax_torch(logits, bitmask, rows))
    assert torch.equal(logits, raw)  # the raw logits stay raw (logprobs read them)
    # the oracle itself keeps something and masks something
    assert bool(torch.isfinite(fast[rows]).any()) == (density > 0.0)
    if density < 0.9 or vocab > 32 * words:
        assert bool(torch.isneginf(fast[rows]).any())
    if density == 1.0 and vocab <= 32 * words:
        assert torch.equal(fast, logits)


@pytest.mark.parametrize(
    "values,allowed_ids,expected",
    [
        ({}, [3, 7, 40], 3),  # ties: the lowest allowed index, as torch.argmax
        ({50: 9.0, 51: 9.0}, [51, 60], 51),  # the best token is forbidden: the best allowed
        ({5: float("nan"), 9: float("nan"), 30: 1.0}, [9, 30], 9),  # a NaN wins, as in torch
        ({40: float("inf"), 41: float("inf")}, [41], 41),
        ({k: float("-inf") for k in range(70)}, [20, 64], 0),  # all allowed at -inf: torch says 0
        ({}, [], 0),  # nothing allowed (never from a grammar): still torch's answer
    ],
)
def test_edge_values_match_torch(kernel, values, allowed_ids, expected) -> None:
    logits = torch.zeros(2, 70)
    for k, v in values.items():
        logits[1, k] = v
    allowed = np.zeros((1, 96), dtype=bool)
    allowed[0, allowed_ids] = True
    bitmask = _pack(allowed)
    ref = masks.argmax_torch(logits, bitmask, [1])
    assert ref.tolist() == [0, expected]
    assert torch.equal(masks.argmax(logits, bitmask, [1]), ref)
    fast, slow = masks.apply(logits, bitmask, [1]), masks.apply_torch(logits, bitmask, [1])
    torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)


def test_bad_shapes_raise_with_the_numbers() -> None:
    logits = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"shape \(1, 2\) for 2 rows"):
        masks.apply(logits, torch.zeros(1, 2, dtype=torch.int32), [0, 1])
    with pytest.raises(ValueError, match="outside the 2 rows"):
        masks.argmax(logits, torch.zeros(1, 2, dtype=torch.int32), [2])


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("num_rows,vocab", [(1, 49152), (16, 49152), (3, 1003), (6, 31)])
def test_argmax_free_is_torch_argmax(threads, num_rows, vocab) -> None:
    """Random rows, plus ties, a NaN, +inf and an all -inf row where there is room for them."""
    g = np.random.default_rng(num_rows * 31 + vocab)
    logits = torch.from_numpy(g.standard_normal((num_rows, vocab), dtype=np.float32))
    if num_rows >= 3:
        logits[0, [vocab - 1, 5, 7]] = 9.0  # ties: the lowest index
        logits[1, [9, 3]] = float("nan")  # a NaN wins, the first one
        logits[2] = float("-inf")
    if num_rows >= 6:
        logits[3, [4, vocab - 2]] = float("inf")
    assert torch.equal(masks.argmax_free(logits), logits.argmax(dim=-1))
