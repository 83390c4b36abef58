"""Packed weights: GGUF blocks map onto them bit for bit, and quant.c matches the plain-torch
reference (dequantize, then F.linear) at every batch shape it serves."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.layers import quant as Q

pytestmark = pytest.mark.timeout(120)

ROWS, COLS = 48, 256
QUANTIZABLE = ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1")  # gguf-py can write these
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # gguf-py only reads these: random blocks
# byte offsets of each K-quant's float16 d (and dmin, a third of it): sane scales in random blocks
K_F16 = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_tensor(kind: str, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """[rows, row_bytes] raw blocks of one GGUF type, as GGUFReader hands them out."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in QUANTIZABLE:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    d = rng.uniform(0.001, 0.02, len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    off, *dmin = K_F16[kind]
    raw[:, off : off + 2] = d
    for o in dmin:
        raw[:, o : o + 2] = (d.view(np.float16) / 3).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def reference_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    return y.float()


def assert_product(got: torch.Tensor, x: torch.Tensor, t: Q.QuantTensor, bias=None) -> None:
    """got == x W^T + b up to float32 summation error: |err| <= 1e-5 * (|x| |W|^T) + 1e-6."""
    w = t.dequantize()
    bound = 1e-5 * F.linear(x.abs().double(), w.abs().double()).float() + 1e-6
    err = (got - reference_linear(x, w, bias)).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound {bound.min():.3g}"


@pytest.mark.parametrize("kind", QUANTIZABLE + K_QUANTS)
def test_dequantize_is_gguf_py_bit_for_bit(kind: str) -> None:
    data = gguf_tensor(kind)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
    t = Q.from_gguf_blocks(kind, data, ROWS, COLS)
    assert t.shape == (ROWS, COLS)
    assert np.array_equal(t.dequantize().numpy(), expected)
    assert torch.equal(Q.dequantize_fast(t), t.dequantize())  # quant.c's qdequant too
    bits = 4 if kind in ("Q4_0", "Q4_1", "Q4_K") else 8
    assert t.fmt.bits == bits
    assert t.nbytes <= ROWS * COLS * (bits + 2 * 32 / t.fmt.group) / 8 + 1  # no float copy


@pytest.mark.parametrize("kind", ("Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q6_K"))
@pytest.mark.parametrize("rows", (1, 2, 3, 7, 8, 9, 16, 65, 130))
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("shape", ((ROWS, COLS), (45, 1280)))
def test_kernel_matches_reference(kind: str, rows: int, threads: int, shape) -> None:
    """Every MR tail (1-8 rows a pass), several passes, and the dequantize-then-GEMM path; 45
    weight rows leave a tail after the 8-row blocks, 1280 columns end on a partial 16-group
    chunk of scales."""
    out, cols = shape
    t = Q.from_gguf_blocks(kind, gguf_tensor(kind, out, cols, seed=rows), out, cols)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, cols, generator=g)
    bias = torch.randn(out, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in (None, bias):
            assert_product(Q.qlinear(x, t, b), x, t, b)
        strided = torch.randn(rows, cols * 2, generator=g)[:, :cols]  # rows ldx apart
        assert_product(Q.qlinear(strided, t, None), strided, t)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ("Q4_0", "Q4_K", "Q6_K"))
def test_big_batches_are_row_invariant(kind: str) -> None:
    """qgemm serves every batch size: a row's product is the same bits among 70 rows as alone
    (a float GEMM's blocking follows m, so it would not be), and matches the reference."""
    out, cols = 45, 1280
    t = Q.from_gguf_blocks(kind, gguf_tensor(kind, out, cols), out, cols)
    assert torch.equal(Q.dequantize_fast(t, start=8, rows=16), t.dequantize()[8:24])
    x = torch.randn(70, cols)
    bias = torch.randn(out)
    y = Q.qlinear(x, t, bias)
    assert_product(y, x, t, bias)
    for i in (0, 37, 69):
        assert torch.equal(Q.qlinear(x[i : i + 1], t, bias)[0], y[i])


@pytest.mark.parametrize("kind", ("Q4_1", "Q8_0"))
def test_zero_rows_give_an_empty_product(kind: str) -> None:
    """A chunked-prefill step that samples nothing sends 0 rows to the lm_head (a soak found
    qgemm refusing them: every prompt longer than one chunk failed on the default model)."""
    t = Q.from_gguf_blocks(kind, gguf_tensor(kind), ROWS, COLS)
    x = torch.randn(0, COLS)
    assert Q.kernel_usable(x)
    assert Q.qlinear(x, t, torch.randn(ROWS)).shape == (0, ROWS)


def test_kernel_is_used_and_torch_path_agrees() -> None:
    """With the kernel off, qlinear is dequantize + F.linear; both give the same numbers."""
    t = Q.from_gguf_blocks("Q4_0", gguf_tensor("Q4_0"), ROWS, COLS)
    x = torch.randn(3, COLS)
    assert Q.kernel_usable(x), "a C compiler is present here: the kernel must build"
    fast = Q.qlinear(x, t, None)
    assert_product(fast, x, t)
    assert_product(Q.qlinear(x, t, None, kernel=False), x, t)


@pytest.mark.parametrize("bits", (8, 4))
def test_round_to_nearest_error_is_bounded(bits: int) -> None:
    w = torch.randn(64, 128)
    t = Q.quantize_rtn(w, bits)
    err = (t.dequantize() - w).abs().reshape(64, 4, 32)
    span = w.reshape(64, 4, 32)
    step = span.abs().amax(-1) / 127 if bits == 8 else (span.amax(-1) - span.amin(-1)) / 15
    assert bool((err.amax(-1) <= step * 0.5 * 1.01 + 1e-3).all())
    with pytest.raises(ValueError, match="whole 32-groups, got 100 columns"):
        Q.quantize_rtn(torch.randn(4, 100), bits)


def test_merging_widens_without_changing_values() -> None:
    """q/k/v (or gate/up) in different formats merge into the widest one exactly."""
    parts = [
        Q.from_gguf_blocks("Q4_0", gguf_tensor("Q4_0", 16), 16, COLS),
        Q.from_gguf_blocks("Q6_K", gguf_tensor("Q6_K", 8), 8, COLS),
        Q.from_gguf_blocks("Q8_0", gguf_tensor("Q8_0", 8), 8, COLS),
    ]
    merged = Q.cat_rows(parts)
    assert merged.fmt == Q.QuantFormat(8, 16, torch.float32, False)  # Q4_0's q - 8 as int8
    assert torch.equal(merged.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(2, COLS)
    assert_product(Q.qlinear(x, merged, None), x, merged)
    # Q4_0 (no mins) beside Q4_1 stays 4-bit: its mins become -8 d
    parts = [Q.from_gguf_blocks(k, gguf_tensor(k, 16), 16, COLS) for k in ("Q4_0", "Q4_1")]
    merged = Q.cat_rows(parts)
    assert merged.fmt == Q.QuantFormat(4, 32, torch.float16, True)
    assert torch.equal(merged.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert_product(Q.qlinear(x, merged, None), x, merged)


def test_low_bit_k_quants_map_and_merge_exactly() -> None:
    """Q2_K (d sc q - dmin m) and Q3_K (d (sc - 32) (q - 4 h')) land on bits 8, group 16, with
    float32 products, Q2_K with mins; a Q3_K_M style merge (Q3_K q, Q2_K k, Q4_K v) keeps every
    part's values, and its product matches F.linear on gguf-py's dequantization."""
    parts = {k: gguf_tensor(k, 8, COLS, seed=i) for i, k in enumerate(("Q3_K", "Q2_K", "Q4_K"))}
    ts = [Q.from_gguf_blocks(k, data, 8, COLS) for k, data in parts.items()]
    assert ts[0].fmt == Q.QuantFormat(8, 16, torch.float32, False)
    assert ts[1].fmt == Q.QuantFormat(8, 16, torch.float32, True)
    assert ts[0].qweight.view(torch.int8).min() >= -4 and ts[0].qweight.view(torch.int8).max() <= 3
    assert int(ts[1].qweight.max()) <= 3
    merged = Q.cat_rows(ts)
    assert merged.fmt == Q.QuantFormat(8, 16, torch.float32, True)
    expected = np.concatenate(
        [gguf.quants.dequantize(d, gguf.GGMLQuantizationType[k]) for k, d in parts.items()]
    )
    assert np.array_equal(merged.dequantize().numpy(), expected)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(5))
    y = Q.qlinear(x, merged, None)
    assert_product(y, x, merged)
    ref = F.linear(x.double(), torch.from_numpy(expected).double())
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_narrowing_for_tensor_parallel_ranks() -> None:
    t = Q.from_gguf_blocks("Q4_1", gguf_tensor("Q4_1"), ROWS, COLS)
    w = t.dequantize()
    assert torch.equal(t.narrow_rows(16, 16).dequantize(), w[16:32])
    assert torch.equal(t.narrow_cols(128, 128).dequantize(), w[:, 128:])
    assert t.narrow_cols(100, 128) is None  # splits a group: the layer falls back to float
    padded = Q.pad_rows(t, ROWS + 3)
    assert padded.shape == (ROWS + 3, COLS) and bool((padded.dequantize()[ROWS:] == 0).all())
    ids = torch.tensor([5, 0, 47])
    assert torch.equal(t.take_rows(ids), w[ids])
