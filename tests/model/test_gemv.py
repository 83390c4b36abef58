"""gemv.c (the CPU decode GEMV) against F.linear, its oracle; and that decode really uses it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model.layers import gemv, kernels
from model.layers.linear import RowParallelLinear, dense

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: tokenmill falls back to oneDNN")
    lib = kernels.load()
    assert lib is not None, "a C compiler is present but gemv.c did not build or load"
    assert gemv.max_rows() == 2
    return lib


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize(
    "n_in,n_out",
    [(576, 960), (1536, 576), (64, 7), (7, 5), (1, 3), (72, 1), (100, 513), (600, 33)],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_f_linear(kernel, rows, n_in, n_out, bias, threads) -> None:
    """Sizes that hit every path: 64-wide blocks, 8-wide tail, scalar tail, tiny outputs."""
    g = torch.Generator().manual_seed(n_in * 1000 + n_out)
    x = torch.randn(rows, n_in, generator=g)
    w = torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert gemv.usable(x, w, b)
        y = gemv.gemv(x, w, b)
    finally:
        torch.set_num_threads(before)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (rows, n_out) and y.dtype == torch.float32
    # float32 accumulation over n_in products of N(0,1) values
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * max(n_in, 8) ** 0.5, rtol=1e-5)


def test_strided_rows_and_views(kernel) -> None:
    """Rows ldx apart (a column slice of a wider output, as SwiGLU's gate half is) are read
    correctly; non-unit element strides and other dtypes are left to oneDNN / F.linear."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 200, generator=g)
    x = wide[:, :96]  # rows 200 floats apart, unit element stride
    w = torch.randn(40, 96, generator=g)
    assert gemv.usable(x, w)
    torch.testing.assert_close(gemv.gemv(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-5)
    assert not gemv.usable(wide[:, ::2], torch.randn(40, 100))  # element stride 2
    assert not gemv.usable(torch.randn(3, 96), w)  # 3 rows: a GEMM
    assert not gemv.usable(x, w.t().contiguous().t())  # column-major weight
    assert not gemv.usable(x.double(), w.double())
    assert not gemv.usable(x.half(), w.half())


def test_dense_routes_decode_rows_to_the_kernel(kernel, monkeypatch) -> None:
    """A 1-row product goes through gemv.c, a 16-row one does not; both equal F.linear."""
    layer = RowParallelLinear(64, 48, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    calls = []
    real = gemv.gemv

    def spy(x, w, b):
        calls.append(x.shape[0])
        return real(x, w, b)

    monkeypatch.setattr(gemv, "gemv", spy)
    for rows in (1, 2, 16):
        x = torch.randn(rows, 64)
        y = dense(layer, x, layer.weight, layer.bias)
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-5)
    assert calls == [1, 2]


def test_disabled_by_environment(tmp_path) -> None:
    """TOKENMILL_CPU_GEMV=0 (the benchmark's A/B switch) leaves the kernel unloaded."""
    code = "from model.layers import gemv, kernels; print(kernels.load() is None, gemv.max_rows())"
    env = {"TOKENMILL_CPU_GEMV": "0", "TOKENMILL_CACHE_DIR": str(tmp_path), "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0"]


def run_without_compiler(tmp_path, code: str) -> list[str]:
    """`code` in a fresh interpreter that finds no C compiler: its first two output lines."""
    env = {"TOKENMILL_CACHE_DIR": str(tmp_path), "PATH": str(tmp_path), "CC": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[:2]


def test_no_compiler_falls_back(tmp_path) -> None:
    """Without a C compiler the kernel is simply absent and dense() still computes."""
    code = (
        "import torch; from model.layers import kernels; from model.layers.linear import "
        "RowParallelLinear, dense; print(kernels.load() is None);"
        "l = RowParallelLinear(8, 4); torch.nn.init.ones_(l.weight);"
        "print(dense(l, torch.ones(1, 8), l.weight, None).tolist())"
    )
    assert run_without_compiler(tmp_path, code) == ["True", "[[8.0, 8.0, 8.0, 8.0]]"]


def test_no_compiler_dequantizes_packed_weights_once(tmp_path) -> None:
    """Without the kernels a packed weight becomes a float weight at load: no per-call
    dequantization, and the products are the packed values'."""
    code = (
        "import torch; from model.layers.linear import RowParallelLinear, dense;"
        "from model.layers.quant import quantize_rtn;"
        "l = RowParallelLinear(32, 4); q = quantize_rtn(torch.ones(4, 32), 8);"
        "l.weight_loader(l.weight, q); print(l.quant is None, l.weight is not None);"
        "x = torch.ones(1, 32); ref = torch.nn.functional.linear(x, q.dequantize());"
        "print(torch.equal(dense(l, x, l.weight, None), ref))"
    )
    assert run_without_compiler(tmp_path, code) == ["True True", "True"]


def test_unwritable_cache_falls_back(tmp_path) -> None:
    """A read-only cache directory (a locked-down container) costs the speed-up, not the start."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = "from model.layers import kernels; print(kernels.load() is None)"
    env = {"TOKENMILL_CACHE_DIR": str(blocker / "sub"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]


def test_cache_disabled_still_builds(tmp_path) -> None:
    """TOKENMILL_CACHE_DIR='' disables caching, not the kernel: it is built for this process
    in a temporary folder, which is removed once the library is loaded."""
    # NOTE: only gemv.c is compiled: 3 s instead of ~20 s for all the kernels
    code = (
        "import glob, tempfile; from model.layers import kernels;"
        "print(kernels.load('native', kernels.SOURCES[:1]) is not None);"
        "print(glob.glob(tempfile.gettempdir() + '/tokenmill-kernels-*'))"
    )
    env = {"TOKENMILL_CACHE_DIR": "", "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["True", "[]"]
