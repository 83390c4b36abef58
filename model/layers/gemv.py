"""The CPU decode GEMV (gemv.c): compiled once per machine, loaded with ctypes, optional.

Decode on CPU is bound by reading the weights; gemv.c streams them at close to memory
bandwidth (~30 GB/s on the 2-core test machine vs ~20 GB/s for oneDNN's GEMV: single-stream
SmolLM2 decode 35.5 -> 21.3 ms a token, measured in one run). Without a C compiler, or with
TOKENMILL_CPU_GEMV=0, every caller falls back to oneDNN / F.linear, which stay the oracle.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from model.disk_cache import cache_dir

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("gemv.c", "quant.c", "decode.c", "bitmask.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lib: ctypes.CDLL | None = None
_tried = False
max_rows = 0  # the largest batch the kernel takes; 0 while unavailable
enabled = True  # benchmarks switch it off to measure oneDNN in the same run


def _cpu_id() -> str:
    """-march=native code runs only on a CPU like the one that built it: key the cache on it."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def _build() -> Path | None:
    """Compile gemv.c into the cache (atomically: parallel processes may race); None on failure."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("no C compiler found: CPU decode uses oneDNN's GEMV (slower)")
        return None
    source = b"".join(p.read_bytes() for p in SOURCES)
    key = hashlib.sha256(source + " ".join([cc, *FLAGS, _cpu_id()]).encode()).hexdigest()[:16]
    root = cache_dir("kernels")
    if root is None:  # caching disabled: build afresh for this process
        root = Path(tempfile.mkdtemp(prefix="tokenmill-kernels-"))
    target = root / f"gemv-{key}.so"
    if target.exists():
        return target
    try:  # a read-only home (some containers) only costs the speed-up
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        logger.info("cannot write the kernel cache %s (%s): CPU decode uses oneDNN", target, e)
        return None
    try:
        subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", tmp],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.info(
            "could not compile %s (%s %s): CPU decode uses oneDNN",
            "+".join(p.name for p in SOURCES),
            e,
            detail.decode(errors="replace")[-500:],
        )
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when disabled or unavailable."""
    global _lib, _tried, max_rows
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("TOKENMILL_CPU_GEMV", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))  # torch is imported: its libgomp.so.1 is the one reused
    except OSError as e:
        logger.info("could not load %s: %s", path, e)
        return None
    finally:
        if cache_dir("kernels") is None:  # a one-off build: the mapped library outlives its file
            shutil.rmtree(path.parent, ignore_errors=True)
    p, i = ctypes.c_void_p, ctypes.c_long
    lib.gemv.argtypes = [p, i, p, p, p, i, i, i, i, ctypes.c_int]
    lib.gemv.restype = ctypes.c_int  # 0, or -1 for sizes it does not take (never passed)
    lib.gemv_max_rows.restype = ctypes.c_int
    max_rows = lib.gemv_max_rows()
    _lib = lib
    return lib


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether gemv() takes this product: CPU float32, a few unit-stride rows, [out, in] weight."""
    return (
        enabled
        and _lib is not None
        and x.dim() == 2
        and 0 < x.shape[0] <= max_rows
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.stride(-1) == 1
        and weight.is_contiguous()
        and not x.requires_grad
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [m, in] @ weight[out, in]^T + bias -> [m, out]; call only when usable() said so."""
    m, n_in = x.shape
    n_out = weight.shape[0]
    if weight.shape[1] != n_in:
        raise ValueError(f"gemv: x has {n_in} columns, weight {tuple(weight.shape)}")
    if _lib is None:
        raise RuntimeError("gemv: the kernel is not loaded (call load() first)")
    y = torch.empty(m, n_out, dtype=torch.float32)  # [m, out]
    b = None if bias is None else bias.data_ptr()
    rc = _lib.gemv(
        x.data_ptr(),
        x.stride(0),
        weight.data_ptr(),
        b,
        y.data_ptr(),
        n_out,
        m,
        n_in,
        n_out,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"gemv: unsupported sizes m={m}, in={n_in}, out={n_out}")
    return y
