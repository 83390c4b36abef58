"""One linear at a time: the int8 path (GGUF blocks x 8-bit activations, qdot.c) against the float32
path (packed weights x float32 activations, quant.c), same weights, same host, one run.

    .venv/bin/python benchmarks/int8_linears.py [--threads 1] [--isa native|avx_vnni|avx2|plain]

Shapes are SmolLM2's and the 1B-class model's (Q4_1, Q8_0 head, Q4_0, Q4_K, Q6_K) at 1, 4, 16 and
64 activation rows (decode, batched decode, prefill). Times are CPU seconds of this process per
call (time.process_time), so a busy host inflates both sides alike; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.layers import kernels  # noqa: E402
from model.layers.qdot import BlockTensor, qx_linear  # noqa: E402
from model.layers.quant import from_gguf_blocks, qlinear  # noqa: E402
from tests.model.test_qdot import random_blocks  # noqa: E402  (the tests' random GGUF blocks)

SHAPES = [  # (GGUF type, out, in): SmolLM2's gate/up and head, the 1B model's gate/up and down
    ("Q4_1", 1536, 576),
    ("Q8_0", 49152, 576),
    ("Q4_0", 8192, 2048),
    ("Q4_K", 8192, 2048),
    ("Q6_K", 2048, 8192),
]


def cpu_ms(fn, n: int) -> float:
    fn()
    t = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa", default=None, help="cap the kernels' ISA (TOKENMILL_CPU_ISA)")
    args = ap.parse_args()
    if args.isa:
        os.environ["TOKENMILL_CPU_ISA"] = args.isa
    torch.set_num_threads(args.threads)
    lib = kernels.load()
    isa = kernels.int8_isa(lib)
    print(f"CPU: {kernels.cpu_name()}; int8 path: {isa}; {args.threads} thread(s)")
    print("| type | out x in | rows | int8 ms | float32 ms | int8 speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, rows, cols in SHAPES:
        raw = random_blocks(kind, rows, cols, seed=0)
        blocks = BlockTensor([(kind, raw.clone())], cols).pack()
        packed = from_gguf_blocks(kind, raw.numpy(), rows, cols)
        for m in (1, 4, 16, 64):
            x = torch.randn(m, cols)
            n = 30 if rows < 20000 else 5
            a = cpu_ms(lambda x=x, b=blocks: qx_linear(x, b, None), n)
            b = cpu_ms(lambda x=x, p=packed: qlinear(x, p, None), n)
            print(f"| {kind} | {rows}x{cols} | {m} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
