"""qdot.c (GGUF blocks x int8 activations) against its float64 reference, on every type and ISA,
and the bitwise batch invariance the int8 path promises."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from model.layers import kernels
from model.layers.qdot import (
    GGML_TYPE_IDS,
    BlockTensor,
    _block,
    quantize_activations,
    qx_linear,
    reference_linear,
)

pytestmark = pytest.mark.timeout(300)

# byte offsets of each type's float16 scale fields (the rest of a block is free bit patterns)
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, row_bytes] of random blocks whose float16 scales are small normal numbers."""
    values, size = _block(kind)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // values, size), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        scale = rng.uniform(0.001, 0.02, size=raw.shape[0]).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(rows, -1))


@pytest.fixture(scope="module")
def lib():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: the int8 path is off and float32 serves")
    lib = kernels.load()
    assert lib is not None, "a C compiler is present but the kernels did not build"
    return lib


def assert_near_reference(y, x, ref_t, bias) -> None:
    """Within float32 block-by-block accumulation of exact integer dots of the float64 reference."""
    ref = reference_linear(x, ref_t, bias)
    scale = (x.abs().double() @ ref_t.dequantize().abs().double().T).max()
    assert (y.double() - ref).abs().max() <= 2e-6 * scale


def assert_rows_alone_match(y, x, t, bias) -> None:
    """Each row computed alone gives the batch's bits (bitwise batch invariance)."""
    alone = torch.cat([qx_linear(x[i : i + 1], t, bias) for i in range(x.shape[0])])
    assert torch.equal(alone, y)


@pytest.mark.parametrize("kind", sorted(GGML_TYPE_IDS))
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_matches_reference(lib, kind, m) -> None:
    """Every type, single rows and batches that hit each MR block size, with a bias."""
    rows, cols = 37, 512
    t = BlockTensor([(kind, random_blocks(kind, rows, cols, seed=m))], cols)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, cols, generator=g)
    bias = torch.randn(rows, generator=g)
    y = qx_linear(x, t, bias)
    assert y.shape == (m, rows) and y.dtype == torch.float32
    assert_near_reference(y, x, t, bias)


def test_mixed_parts_keep_their_types(lib) -> None:
    """A merged projection whose parts differ in type (Q4_K_M's q/k Q4_K, v Q6_K) computes each
    part with its own kernel and activation blocks, into one output."""
    cols = 256
    parts = [
        ("Q4_K", random_blocks("Q4_K", 8, cols, 1)),
        ("Q6_K", random_blocks("Q6_K", 4, cols, 2)),
    ]
    parts.append(("Q8_0", random_blocks("Q8_0", 4, cols, 3)))
    t = BlockTensor(parts, cols)
    assert t.shape == (16, cols) and t.nbytes == 8 * 144 + 4 * 210 + 4 * 8 * 34
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(0))
    y = qx_linear(x, t, None)
    ref = reference_linear(x, t)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q6_K"])
def test_rows_are_batch_and_thread_invariant(lib, kind) -> None:
    """One row's outputs are the same floats alone, at any position of a batch of 1..13, and at
    1 or 2 threads: per-row activation scales, per-row accumulation order."""
    cols = 768
    t = BlockTensor([(kind, random_blocks(kind, 70, cols, 5))], cols)
    x = torch.randn(13, cols, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([qx_linear(x[i : i + 1], t, None) for i in range(13)])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in (2, 5, 8, 13):
                assert torch.equal(qx_linear(x[:m], t, None), alone[:m]), (threads, m)
    finally:
        torch.set_num_threads(before)


def test_low_bit_k_quant_mix_keeps_each_part(lib) -> None:
    """A Q2_K / Q3_K_M style merged projection (Q2_K, Q3_K, Q4_K and Q6_K parts, as
    llama-quantize mixes them): each part its own kernel, the file's bytes resident (no panels
    for Q2_K / Q3_K, whatever the build), every row against the reference."""
    cols = 512
    kinds = [("Q3_K", 6), ("Q2_K", 5), ("Q4_K", 3), ("Q6_K", 2), ("Q3_K", 4)]
    parts = [(k, random_blocks(k, n, cols, seed=i)) for i, (k, n) in enumerate(kinds)]
    ref_t = BlockTensor([(k, d.clone()) for k, d in parts], cols)
    t = BlockTensor(parts, cols)
    file_bytes = 2 * (6 + 4) * 110 + 2 * 5 * 84 + 2 * 3 * 144 + 2 * 2 * 210
    assert t.shape == (20, cols) and t.nbytes == file_bytes
    for kind in ("Q2_K", "Q3_K"):
        assert lib.px_supported(GGML_TYPE_IDS[kind]) == 0, kind
    t.pack()  # Q4_K / Q6_K may go to panels (same bytes, padded to 16 rows); Q2_K / Q3_K stay
    low = [(d, p) for (k, d), p in zip(t.parts, t.panels, strict=True) if k in ("Q2_K", "Q3_K")]
    assert all(p is None for _, p in low) and sum(d.numel() for d, _ in low) == 10 * 220 + 5 * 168
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, cols, generator=g)
    bias = torch.randn(20, generator=g)
    y = qx_linear(x, t, bias)
    assert_near_reference(y, x, ref_t, bias)
    assert_rows_alone_match(y, x, t, bias)


def test_activation_quantization_matches_the_kernels_blocks(lib) -> None:
    """The torch reference of the activation blocks: scale max|x| / 127, round half to even."""
    x = torch.tensor([[127.0, 0.5, -1.5, 2.5] + [0.0] * 28])
    d, q = quantize_activations(x, 32)
    assert d.tolist() == [[1.0]] and q[0, :4].tolist() == [127, 0, -2, 2]
    d, q = quantize_activations(torch.zeros(1, 32), 32)
    assert d.tolist() == [[0.0]] and not q.any()


def test_rejects_bad_sizes(lib) -> None:
    """A row that is not whole blocks is refused before any C call."""
    with pytest.raises(ValueError, match="does not hold rows of 100 values"):
        BlockTensor([("Q4_0", torch.zeros(2, 18, dtype=torch.uint8))], 100)
    t = BlockTensor([("Q4_0", random_blocks("Q4_0", 2, 64, 0))], 64)
    with pytest.raises(ValueError, match="x has 32 columns"):
        qx_linear(torch.randn(1, 32), t, None)


@pytest.mark.parametrize("isa", ["avx2", "plain"])
def test_capped_isas_agree(lib, isa) -> None:
    """TOKENMILL_CPU_ISA's capped builds compute the same products (to the float rounding of
    their lane count) and report which path they took."""
    capped = kernels.load(isa)
    assert capped is not None and kernels.int8_isa(capped) == isa
    cols = 512
    for kind in sorted(GGML_TYPE_IDS):
        t = BlockTensor([(kind, random_blocks(kind, 9, cols, 7))], cols)
        x = torch.randn(5, cols, generator=torch.Generator().manual_seed(1))
        ref = reference_linear(x, t)
        k = int(kind.endswith("_K"))
        xq = torch.empty(5 * capped.qx_row_bytes(cols, k), dtype=torch.uint8)
        assert capped.qx_quantize(x.data_ptr(), cols, 5, cols, k, xq.data_ptr(), 1) == 0
        ((_, data),) = t.parts
        y = torch.empty(5, 9)
        rc = capped.qx_gemm(
            GGML_TYPE_IDS[kind], data.data_ptr(), data.shape[1], 9, cols, xq.data_ptr(), 5,
            y.data_ptr(), 9, None, 1,
        )  # fmt: skip
        assert rc == 0
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max(), kind


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [16, 37])
def test_panels_match_reference(lib, kind, rows) -> None:
    """The 16-row panel layout (where the build has it) computes the same products as the file's
    blocks, keeps the file's size, and stays batch-invariant: 2560 columns are three K chunks of
    px_gemm (the last one short) for 17 rows, one pass for a row alone."""
    if not lib.px_supported(GGML_TYPE_IDS[kind]):
        pytest.skip(f"this build ({kernels.int8_isa(lib)}) multiplies {kind} row by row")
    cols = 2560
    raw = random_blocks(kind, rows, cols, seed=rows)
    t = BlockTensor([(kind, raw.clone())], cols)
    ref_t = BlockTensor([(kind, raw)], cols)
    file_bytes = t.nbytes
    t.pack()
    assert t.panels[0] is not None and t.parts[0][1].numel() == 0
    padded = (rows + 15) // 16 * 16
    assert t.nbytes <= file_bytes * padded / rows * 1.03  # Q4_K's 6-bit scales take a byte
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(17, cols, generator=g)
    bias = torch.randn(rows, generator=g)
    y = qx_linear(x, t, bias)
    assert_near_reference(y, x, ref_t, bias)
    assert_rows_alone_match(y, x, t, bias)
    with pytest.raises(ValueError, match="keeps only its panels"):
        t.dequantize()


@pytest.mark.parametrize("isa", ["avx_vnni", "avx2"])
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
def test_capped_panels_give_the_same_bits(lib, isa, kind) -> None:
    """The AVX-VNNI / AVX2 builds multiply the same panels as two 8-row halves (AVX2: int16 pair
    sums, |q| for Q8_0): the integers and the float epilogue are the AVX-512 panels', so the bits
    are too; 45 rows end in a panel whose second half is short, 2560 columns are three K chunks."""
    capped = kernels.load(isa)
    if capped is None or not capped.px_supported(GGML_TYPE_IDS[kind]):
        pytest.skip(f"the {isa} build has no {kind} panels")
    rows, cols, m = 45, 2560, 9
    raw = random_blocks(kind, rows, cols, seed=5)
    ref_t = BlockTensor([(kind, raw.clone())], cols)
    t = BlockTensor([(kind, raw)], cols).pack()
    g = torch.Generator().manual_seed(2)
    x, bias = torch.randn(m, cols, generator=g), torch.randn(rows, generator=g)

    def run(lib_, xs):
        k = int(kind.endswith("_K"))
        xq = torch.empty(xs.shape[0] * lib_.qx_row_bytes(cols, k), dtype=torch.uint8)
        assert lib_.qx_quantize(xs.data_ptr(), cols, xs.shape[0], cols, k, xq.data_ptr(), 1) == 0
        y = torch.empty(xs.shape[0], rows)
        rc = lib_.px_gemm(
            GGML_TYPE_IDS[kind], t.panels[0].data_ptr(), rows, cols, xq.data_ptr(), xs.shape[0],
            y.data_ptr(), rows, bias.data_ptr(), 2,
        )  # fmt: skip
        assert rc == 0
        return y

    y = run(capped, x)
    assert_near_reference(y, x, ref_t, bias)
    assert torch.equal(torch.cat([run(capped, x[i : i + 1]) for i in range(m)]), y)
    if lib.px_supported(GGML_TYPE_IDS[kind]):
        assert torch.equal(run(lib, x), y)


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_packs_as_gguf_blocks(bits) -> None:
    """--quantization int8 / int4 on the int8 path: quantize_rtn's bytes as Q8_0 / Q4_1 blocks
    dequantize (by gguf-py) to exactly the packed reference's values."""
    from model.layers.qdot import rtn_to_blocks
    from model.layers.quant import quantize_rtn

    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(bits))
    q = quantize_rtn(w, bits)
    b = rtn_to_blocks(q)
    assert b.parts[0][0] == ("Q8_0" if bits == 8 else "Q4_1") and b.nbytes == q.nbytes
    assert torch.equal(b.dequantize(), q.dequantize())


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
def test_panel_rows_are_gguf_py_values(lib, kind) -> None:
    """Embedding lookups read panel rows: exactly gguf-py's dequantized values, any row order;
    an id past the table is refused."""
    if not lib.px_supported(GGML_TYPE_IDS[kind]):
        pytest.skip(f"this build ({kernels.int8_isa(lib)}) has no {kind} panels")
    raw = random_blocks(kind, 21, 512, seed=4)
    ref = BlockTensor([(kind, raw.clone())], 512).dequantize()
    t = BlockTensor([(kind, raw)], 512).pack()
    ids = torch.tensor([20, 0, 16, 15, 3, 3])
    assert torch.equal(t.take_rows(ids), ref[ids])
    with pytest.raises(ValueError, match="out of range"):
        t.take_rows(torch.tensor([21]))
