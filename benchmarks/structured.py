"""Constrained vs unconstrained decoding on the engine: output tok/s, compile and mask times.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/structured.py [--streams 1 16] [--max-tokens 64]
        [--no-overlap | --fill-during-forward] [--no-lazy] [--temperature T] [--repeats N]

At each stream count S, S requests run together (greedy unless --temperature, ignore_eos) with
every request constrained to a JSON schema (an object holding at least 24 short strings: enough
to fill max_tokens), and without; the two kinds alternate --repeats times (default 3) and the
run with the median tok/s of each kind is reported (the host's speed drifts from minute to
minute). Decode tok/s counts the tokens after the prefill step over the
time after it. The schema differs per request (a distinct `title`), so every request compiles
its own grammar. Per-step mask fill is the bitmask fill time (by default on a thread, started as
soon as the previous step's tokens are accepted, so it overlaps detokenizing, scheduling and the
forward on a GPU, ending before the forward on a CPU; `--no-overlap` fills just before the
forward); mask wait is the part of it on the step's path (filling or waiting before the forward
and in the sampler), i.e. what the fill cost the step. The sample time includes applying the
mask. On a CPU greedy rows are lazy: after their first step they get a mask only where the
model's own pick breaks the grammar, filled in the sampler (`--no-lazy` fills every mask).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from model.sampling_params import SamplingParams, StructuredOutputsParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine


def schema(i: int) -> str:
    return json.dumps(
        {
            "title": f"record {i}",
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "items": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 8},
                    "minItems": 24,  # long enough to reach max_tokens, like the free run
                },
            },
            "required": ["name", "items"],
            "additionalProperties": False,
        }
    )


def run(
    engine: LLMEngine,
    streams: int,
    max_tokens: int,
    constrained: bool,
    base: int,
    temperature: float = 0.0,
) -> dict:
    prompt = "List the things you would pack for a trip, as JSON."
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    for i in range(streams):
        spec = StructuredOutputsParams("json", schema(base + i)) if constrained else None
        params = SamplingParams(
            temperature=temperature,
            seed=base + i,
            max_tokens=max_tokens,
            ignore_eos=True,
            structured_outputs=spec,
        )
        engine.add_request(f"r{base + i}", ids, params)
    masks, waits, samples, steps, tokens = [], [], [], 0, 0
    t_first = None  # after the step that prefilled every prompt: decode only from here
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += sum(len(o.token_ids) for o in out.outputs)
        if t_first is None and tokens >= streams:
            t_first, first_tokens = time.perf_counter(), tokens
        split = engine.get_stats().step_time_split
        steps += 1
        if "mask" in split:
            masks.append(split["mask"])
            waits.append(split["mask_wait"])
        samples.append(split.get("sample", 0.0))
    return {
        "tokens": tokens,
        "tok_s": (tokens - first_tokens) / (time.perf_counter() - t_first),
        "steps": steps,
        "mask_ms": statistics.mean(masks) * 1e3 if masks else 0.0,
        "wait_ms": statistics.mean(waits) * 1e3 if waits else 0.0,
        "sample_ms": statistics.mean(samples) * 1e3,
    }


def _median(runs: list[dict]) -> float:
    return statistics.median(r["tok_s"] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument(
        "--no-overlap", action="store_true", help="fill masks just before the forward instead"
    )
    ap.add_argument(
        "--fill-during-forward",
        action="store_true",
        help="let fills run on during the forward (the default on GPUs, not on CPUs)",
    )
    ap.add_argument(
        "--no-lazy", action="store_true", help="fill every greedy row's mask (lazy on CPUs)"
    )
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy; > 0: seeded sampling"
    )
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each kind")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model))
    run(engine, 1, 4, True, 10_000)  # warm-up: builds the grammar tokenizer (~1 s, once)
    run(engine, 2, 4, False, 10_010)  # warm-up: the decode kernels (built on first use)
    engine.constraints.overlap = not args.no_overlap
    engine.constraints.fill_during_forward |= args.fill_during_forward
    engine.constraints.lazy &= not (args.no_lazy or args.fill_during_forward)
    engine.constraints.compile_times.clear()
    print("| streams | unconstrained decode tok/s | JSON-schema decode tok/s | ratio "
          "| output tokens (not / constrained) | mask fill ms/step | mask wait ms/step "
          "| sample ms/step (constrained / not) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    base = 0
    for s in args.streams:
        # NOTE: alternated and repeated, medians kept: this host's speed drifts ~10% a minute
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for constrained in (False, True):
                runs[constrained].append(
                    run(engine, s, args.max_tokens, constrained, base, args.temperature)
                )
                base += s
        free, cons = (
            min(runs[c], key=lambda r: abs(r["tok_s"] - _median(runs[c]))) for c in (False, True)
        )
        print(
            f"| {s} | {free['tok_s']:.1f} | {cons['tok_s']:.1f} | "
            f"{cons['tok_s'] / free['tok_s']:.2f} | {free['tokens']} / {cons['tokens']} | "
            f"{cons['mask_ms']:.3f} | {cons['wait_ms']:.3f} | "
            f"{cons['sample_ms']:.2f} / {free['sample_ms']:.2f} |"
        )
    times = engine.constraints.compile_times
    print(
        f"schema compile: {len(times)} schemas, median {statistics.median(times) * 1e3:.1f} ms, "
        f"max {max(times) * 1e3:.1f} ms"
    )
    engine.shutdown()


if __name__ == "__main__":
    main()
