"""Is one greedy request the same floats alone and among 15 others? Offline, default model.

    .venv/bin/python benchmarks/batch_invariance.py [--activation-dtype float32|int8] [--model M]

The target request runs alone on a fresh engine, then as the 8th of 16 requests added at once (a
fresh engine again, so no prefix-cache hit), with the default token budget and with
`--max-num-batched-tokens 64` (chunked prefills, mixed steps). Prints whether its 24 chosen-token
logprobs are bitwise equal, else the largest difference.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.sampling_params import SamplingParams  # noqa: E402
from scheduler.llm import LLM  # noqa: E402

TARGET = "Write a short poem about the sea and the wind, in four lines."
OTHERS = [
    f"Tell me fact number {i} about the history of mathematics and its long story." * (1 + i % 3)
    for i in range(15)
]


def logprobs(llm: LLM, prompts: list[str], index: int) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    out = llm.generate(prompts, params)[index]
    return [lp.logprob for lp in out.outputs[0].logprobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--activation-dtype", default="float32", choices=("float32", "int8"))
    ap.add_argument("--model", default=None, help="GGUF or folder (default: SmolLM2's GGUF)")
    args = ap.parse_args()
    for budget in (None, 64):
        kw = {"activation_dtype": args.activation_dtype, "kv_cache_memory": "256MiB"}
        if args.model:
            kw["model"] = args.model
        if budget:
            kw["max_num_batched_tokens"] = budget
        runs = []
        for prompts, index in (([TARGET], 0), (OTHERS[:7] + [TARGET] + OTHERS[7:], 7)):
            llm = LLM(**kw)
            runs.append(logprobs(llm, prompts, index))
            llm.shutdown()
        alone, together = runs
        diff = max(abs(a - b) for a, b in zip(alone, together, strict=True))
        verdict = "bitwise equal" if alone == together else f"differ, max {diff:.2e}"
        print(f"{args.activation_dtype}, max_num_batched_tokens {budget or 'default'}: {verdict}")


if __name__ == "__main__":
    main()
