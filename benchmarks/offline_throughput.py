"""Offline throughput of the engine: prefill, decode at 64 sequences, single-stream decode.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/offline_throughput.py [--model PATH] [--threads 2]

Prints tokens/s for each phase and the mean per-step time split (schedule / prepare / forward /
sample / update / detokenize, and comm under tensor parallelism), as measured by the engine's own
SchedulerStats, so the numbers are what a server would see. With --tensor-parallel-size N every
rank runs --threads threads (on a 2-core machine use --threads 1 for N=2), and `comm` (rank 0's
time inside all-reduces and the logits gather, part of forward) is also shown per collective and
per layer (a layer does 2 all-reduces; a step does 2 x layers + 1 all-reduces and 1 gather).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch

from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine

WORDS = (
    "river mountain engine quiet orange seven paper window garden silver thunder market "
    "lantern copper harbor violet meadow canyon ribbon falcon pepper marble winter saddle"
).split()


def make_prompt(engine: LLMEngine, rng: random.Random, num_tokens: int) -> list[int]:
    """Random words cut to an exact token count: varied, so the prefix cache cannot help."""
    text = " ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(num_tokens))
    return engine.tokenizer.encode(text)[:num_tokens]


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    split: dict[str, float] = defaultdict(float)
    steps = prefill_tokens = decode_tokens = 0
    prefill_time = decode_time = 0.0
    decode_steps = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        stats = engine.get_stats()
        steps += 1
        for k, v in stats.step_time_split.items():
            split[k] += v
        if stats.step_num_tokens == stats.step_num_seqs:  # every scheduled sequence decodes
            decode_tokens += stats.step_num_tokens
            decode_time += dt
            decode_steps += 1
        else:
            prefill_tokens += stats.step_num_tokens
            prefill_time += dt
    total = time.perf_counter() - start
    return {
        "wall_s": total,
        "steps": steps,
        "prefill_tokens": prefill_tokens,
        "prefill_tok_s": prefill_tokens / prefill_time if prefill_time else 0.0,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_time if decode_time else 0.0,
        "decode_ms_per_step": 1000 * decode_time / decode_steps if decode_steps else 0.0,
        "split_ms_per_step": {k: 1000 * v / steps for k, v in split.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2 GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode request")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False,
        )
    )
    rng = random.Random(0)
    run(engine, [make_prompt(engine, rng, 32)], 4)  # warm-up

    results = {
        "prefill_16x": run(
            engine,
            [make_prompt(engine, rng, args.prompt_tokens) for _ in range(16)],
            1,
        ),
        "decode_64_seqs": run(
            engine, [make_prompt(engine, rng, 32) for _ in range(64)], args.decode_tokens
        ),
        "single_stream": run(engine, [make_prompt(engine, rng, 32)], args.decode_tokens),
    }
    engine.shutdown()
    print(
        f"model={engine.model_name} threads={args.threads} dtype={args.dtype} "
        f"tp={args.tensor_parallel_size}"
    )
    print(
        f"(a) prefill 16 x {args.prompt_tokens} tokens : "
        f"{results['prefill_16x']['prefill_tok_s']:8.1f} tokens/s"
    )
    print(
        f"(b) decode, 64 sequences       : {results['decode_64_seqs']['decode_tok_s']:8.1f} "
        f"tokens/s ({results['decode_64_seqs']['decode_ms_per_step']:.1f} ms/step)"
    )
    print(
        f"(c) single-stream decode       : {results['single_stream']['decode_tok_s']:8.1f} "
        f"tokens/s ({results['single_stream']['decode_ms_per_step']:.1f} ms/token)"
    )
    for name, r in results.items():
        split = " ".join(f"{k}={v:.2f}" for k, v in r["split_ms_per_step"].items())
        print(f"    step split {name:15s} ms/step: {split}")
    if args.tensor_parallel_size > 1:
        layers = engine.model_config.num_hidden_layers
        per_step = 2 * layers + 2  # 2 all-reduces per layer, the embedding's, the gather
        for name, r in results.items():
            comm = r["split_ms_per_step"].get("comm", 0.0)
            fwd = r["split_ms_per_step"].get("forward", 0.0)
            r["comm_us_per_collective"] = 1000 * comm / per_step
            r["comm_ms_per_layer"] = 2 * comm / per_step
            print(
                f"    comm {name:15s}: {comm:.2f} ms/step ({100 * comm / max(fwd, 1e-9):.0f}% of "
                f"forward) = {r['comm_us_per_collective']:.0f} us per collective, "
                f"{r['comm_ms_per_layer']:.3f} ms per layer ({per_step} collectives/step)"
            )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
