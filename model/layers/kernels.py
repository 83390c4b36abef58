"""Every CPU kernel in one place: the C files are compiled together once per CPU, compiler and ISA,
cached on disk, loaded with ctypes and bound from one table of signatures.

The five files (gemv.c: float decode GEMV; quant.c: packed weights with float activations;
qdot.c: GGUF blocks with int8 activations; decode.c: a whole decode step; bitmask.c: grammar
masks) share kernels.h and build in ~20 s on 2 cores, once per machine. The ISA is the CPU's own
(-march=native) unless capped, for A/B benchmarks on one host, by `isa=` or TOKENMILL_CPU_ISA:
avx_vnni (no AVX-512), avx2 (neither AVX-512 nor AVX-VNNI) or plain (no AVX at all). Without a C
compiler, with an unwritable cache, or with TOKENMILL_CPU_GEMV=0, load() returns None and every
caller serves with torch (the reference), never re-dequantizing packed weights per call more than
the float path already does.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from model.disk_cache import cache_dir

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = [_HERE / n for n in ("gemv.c", "quant.c", "qdot.c", "decode.c", "bitmask.c")]
HEADERS = [_HERE / "kernels.h"]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
ISA_FLAGS = {
    "native": [],
    "avx_vnni": ["-mno-avx512f"],
    "avx2": ["-mno-avx512f", "-mno-avxvnni"],
    "plain": ["-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx512f", "-mno-avxvnni"],
}

_p, _l, _i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
# name: (restype, argtypes), for every exported function of the C files
SIGNATURES: dict[str, tuple] = {
    "gemv": (_i, [_p, _l, _p, _p, _p, _l, _l, _l, _l, _i]),
    "gemv_max_rows": (_i, []),
    "qgemm": (_i, [_p, _l, _p, _p, _p, _i, _i, _i, _p, _p, _l, _l, _l, _l, _i]),
    "qdequant": (_i, [_p, _p, _p, _i, _i, _i, _p, _l, _l, _i]),
    "qx_isa": (ctypes.c_char_p, []),
    "qx_row_bytes": (_l, [_l, _i]),
    "qx_act_kind": (_i, [_i]),
    "qx_quantize": (_i, [_p, _l, _l, _l, _i, _p, _i]),
    "qx_gemm": (_i, [_i, _p, _l, _l, _l, _p, _l, _p, _l, _p, _i]),
    "px_supported": (_i, [_i]),
    "px_bytes": (_l, [_i, _l, _l]),
    "px_pack": (_i, [_i, _p, _l, _l, _l, _p, _i]),
    "px_gemm": (_i, [_i, _p, _l, _l, _p, _l, _p, _l, _p, _i]),
    "px_rows": (_i, [_i, _p, _l, _l, _p, _l, _p]),
    "decode_layers": (_i, [_i, _p, _p, _p, _p, _p, _l, *[_p] * 8, _i, _p, _l, _i]),
    "decode_scratch": (_l, [_p, _l, _l, _i]),
    "moe_route": (_i, [_p, _i, _i, _i, _p, _l, _i, _p, _p, _p, _i]),
    "bitmask_argmax": (None, [_p, _l, _l, _p, _l, _p, _l, _p, _i]),
    "bitmask_apply": (None, [_p, _p, _l, _l, _p, _l, _p, _l, _i]),
}


def _cpu_id() -> str:
    """-march=native code runs only on a CPU like the one that built it: key the cache on it."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        import platform

        return platform.machine() + platform.processor()


def cpu_name() -> str:
    """The CPU's model name, for benchmark tables and the start-up log."""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build(sources: list[Path], isa: str) -> Path | None:
    """Compile the sources into the cache (atomically: parallel processes may race)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        logger.info("no C compiler found: CPU kernels off, torch serves every step")
        return None
    flags = FLAGS + ISA_FLAGS[isa]
    source = b"".join(p.read_bytes() for p in sources + HEADERS)
    key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    root = cache_dir("kernels")
    if root is None:  # caching disabled: build afresh for this process
        root = Path(tempfile.mkdtemp(prefix="tokenmill-kernels-"))
    target = root / f"kernels-{isa}-{key}.so"
    if target.exists():
        return target
    try:  # a read-only home (some containers) only costs the speed-up
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as e:
        logger.info("cannot write the kernel cache %s (%s): CPU kernels off", target, e)
        return None
    try:
        subprocess.run(
            [cc, *flags, *map(str, sources), "-o", tmp],
            check=True,
            capture_output=True,
            timeout=300,
        )
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.info(
            "could not compile the CPU kernels (%s %s): torch serves every step",
            e,
            detail.decode(errors="replace")[-500:],
        )
        Path(tmp).unlink(missing_ok=True)
        return None
    return target


def _bind(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is not None:  # a test may build a subset of the sources
            fn.restype, fn.argtypes = restype, argtypes


@functools.cache
def _load(isa: str, sources: tuple[Path, ...]) -> ctypes.CDLL | None:
    path = _build(list(sources), isa)
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
    _bind(lib)
    return lib


def load(isa: str | None = None, sources: list[Path] | None = None) -> ctypes.CDLL | None:
    """The kernel library, built on first use; None when disabled or unavailable.

    isa: "native", "avx_vnni", "avx2" or "plain"; None: TOKENMILL_CPU_ISA, else native.
    """
    if isa is None and sources is None:
        return _default()
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa {isa!r} is not one of {sorted(ISA_FLAGS)}")
    return _load(isa, tuple(sources or SOURCES))


@functools.cache
def _default() -> ctypes.CDLL | None:
    """The process's library, environment read once (callers ask for it on every layer)."""
    if os.environ.get("TOKENMILL_CPU_GEMV", "1") == "0":
        return None
    isa = os.environ.get("TOKENMILL_CPU_ISA") or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"TOKENMILL_CPU_ISA {isa!r} is not one of {sorted(ISA_FLAGS)}")
    return _load(isa, tuple(SOURCES))


def int8_isa(lib: ctypes.CDLL | None) -> str | None:
    """The integer dot-product path qdot.c was built with (avx512_vnni, avx_vnni, avx2, plain)."""
    return None if lib is None else lib.qx_isa().decode()
