"""Speculative decoding (n-gram prompt lookup) against none: output tok/s, tokens per step,
acceptance, and whether the replies are identical (greedy).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/spec_decode.py [--model PATH] [--streams 1]
        [--max-tokens 128] [--spec '{"method": "ngram", "num_speculative_tokens": 4, ...}']
        [--no-gate] [--peer-binary LLAMA_SERVER [--peer-spec "--spec-type ngram-simple ..."]]

With --peer-binary, llama-server serves the same token prompts (one at a time, greedy, no prompt
cache) without and with its own speculation (--peer-spec: its flags), and the table adds its
decode tok/s (timings.predicted_n / predicted_ms) and draft counts (timings.draft_n, _accepted).

Grounded prompts carry a passage or code the answer copies or lightly edits; free-form prompts
ask for stories and explanations. Each workload runs once without and once with speculation on
the same engine settings; time counts from the first token to the last (decode only).
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
import time

import httpx
import torch

from model.sampling_params import SamplingParams
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine

PASSAGE = (
    "The river starts in the northern mountains, where snow melts every spring and feeds a "
    "dozen small streams. It flows south through pine forests and farmland for about three "
    "hundred kilometres before it reaches the old harbour town of Calder, where most of the "
    "region's grain is loaded onto ships. In 1911 a flood destroyed the lower bridge, and the "
    "town council built the stone bridge that still stands today."
)
CODE = """def load_config(path):
    with open(path) as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError("config has no name")
    data.setdefault("timeout", 30)
    data.setdefault("retries", 3)
    return data
"""
LETTER = (
    "Dear Ms Patel, thank you for your letter of 12 March about the delivery of the office "
    "chairs. We are sorry that four of the twenty chairs arrived with broken wheels. Our driver "
    "will collect the damaged chairs on Monday morning, and new chairs will be delivered on "
    "Wednesday afternoon at no extra cost. If this time does not suit you, please call our "
    "customer service team on 0161 496 0000 and we will arrange another day. Yours sincerely, "
    "Tom Barker, Customer Service Manager."
)
GROUNDED = [
    f"Repeat this text exactly: {PASSAGE}",
    f"Copy this letter, changing only the name Tom Barker to Anna Reed:\n\n{LETTER}",
    f"Rewrite this function so the default timeout is 60 instead of 30:\n\n{CODE}",
    f"Here is a passage:\n\n{PASSAGE}\n\nQuote the sentence about the flood, then summarise the "
    "passage using its own words.",
    f"Add a docstring to this function and return it whole:\n\n{CODE}",
    f"Correct the punctuation of this letter and return the whole letter:\n\n{LETTER}",
]
FREE_FORM = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a poem about autumn in a city.",
    "Give me three ideas for a weekend trip and explain each one.",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}  # fmt: skip


def run(engine: LLMEngine, prompts: list[list[int]], streams: int, max_tokens: int) -> dict:
    """All prompts, `streams` at a time; decode seconds from each batch's first to last token."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs, decode_s, tokens, steps = [], 0.0, 0, 0
    for at in range(0, len(prompts), streams):
        batch = prompts[at : at + streams]
        for i, p in enumerate(batch):
            engine.add_request(f"b{time.monotonic_ns()}-{i}", p, params)
        got: dict[str, list[int]] = {}
        first = None
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            for out in outs:
                for d in out.outputs:
                    got.setdefault(out.request_id, []).extend(d.token_ids)
            if outs and first is None:
                first, n0 = now, sum(map(len, got.values()))
            if first is not None:
                steps += 1
        decode_s += now - first
        tokens += sum(map(len, got.values())) - n0
        outputs += [got[k] for k in sorted(got)]
    s = engine.get_stats()
    return dict(
        outputs=outputs,
        tok_s=tokens / decode_s,
        tokens_per_step=tokens / max(steps - 1, 1),
        drafted=s.spec_decode_num_draft_tokens_total,
        accepted=s.spec_decode_num_accepted_tokens_total,
    )


def measure(args: argparse.Namespace) -> dict:
    """One engine (with or without speculation) over both workloads, in this process."""
    torch.set_num_threads(args.threads)
    spec = None if args.config == "off" else args.spec
    engine = LLMEngine(EngineConfig(model=args.model, speculative_config=spec, max_model_len=2048))
    if args.no_gate:
        engine.scheduler.spec_gate = None
    tok, out = engine.tokenizer, {}
    for workload, texts in (("grounded", GROUNDED), ("free-form", FREE_FORM)):
        prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        prompts = (prompts * args.streams)[: max(len(prompts), args.streams)]
        run(engine, prompts[:1], 1, 8)  # warm-up
        engine.scheduler.spec_stats.__init__()  # counted per workload
        out[workload] = run(engine, prompts, args.streams, args.max_tokens)
    return out


def peer(args: argparse.Namespace, spec: str, workloads: dict[str, list]) -> dict:
    """llama-server on the same token prompts, one at a time: decode tok/s and drafts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [args.peer_binary, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
           "-c", "4096", "--parallel", "1", "-t", str(args.threads), "-tb", str(args.threads),
           "--no-webui", *shlex.split(spec)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, out = f"http://127.0.0.1:{port}", {}
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # NOTE: polling a child process's start-up, not synchronising a test
        for workload, prompts in workloads.items():
            n = ms = drafted = accepted = 0
            outputs = []
            for p in prompts:
                body = {"prompt": p, "n_predict": args.max_tokens, "temperature": 0.0,
                        "cache_prompt": False, "return_tokens": True}  # fmt: skip
                r = httpx.post(f"{url}/completion", json=body, timeout=600).json()
                t = r["timings"]
                n, ms = n + t["predicted_n"] - 1, ms + t["predicted_ms"]
                drafted += t.get("draft_n", 0)
                accepted += t.get("draft_n_accepted", 0)
                outputs.append(r.get("tokens", []))
            out[workload] = dict(tok_s=1000 * n / ms, drafted=drafted, accepted=accepted,
                                 outputs=outputs)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def peer_rows(args: argparse.Namespace, res: dict) -> None:
    """llama-server without and with its speculation, beside tokenmill's speculative run."""
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    workloads = {w: [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
                 for w, texts in (("grounded", GROUNDED), ("free-form", FREE_FORM))}  # fmt: skip
    off, on = peer(args, "", workloads), peer(args, args.peer_spec, workloads)
    for w in workloads:
        ours = res["spec"][w]["tok_s"]
        print(
            f"{w:9s} llama-server: off {off[w]['tok_s']:6.1f} tok/s, spec {on[w]['tok_s']:6.1f} "
            f"tok/s ({on[w]['tok_s'] / off[w]['tok_s']:.2f}x), accepted {on[w]['accepted']}/"
            f"{on[w]['drafted']}, identical {off[w]['outputs'] == on[w]['outputs']}; tokenmill "
            f"spec / llama-server spec {ours / on[w]['tok_s']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spec", type=json.loads, default=NGRAM)
    ap.add_argument("--no-gate", action="store_true", help="draft even where it does not pay")
    ap.add_argument("--peer-binary", default=None, help="llama-server to compare against")
    ap.add_argument(
        "--peer-spec",
        default="--spec-type ngram-simple --spec-ngram-simple-size-n 4 "
        "--spec-ngram-simple-size-m 6",
        help="llama-server's speculation flags",
    )
    ap.add_argument("--config", choices=("off", "spec"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_binary and args.model is None:
        from scheduler.config import default_model_path

        args.model = default_model_path()
    if args.config:  # NOTE: one engine per process: two engines' kernel threads compete
        print(json.dumps(measure(args)))
        return
    res = {}
    for config in ("off", "spec"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--config", config]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True)
        res[config] = json.loads(done.stdout.strip().splitlines()[-1])
    for workload in res["off"]:
        off, on = res["off"][workload], res["spec"][workload]
        rate = on["accepted"] / on["drafted"] if on["drafted"] else 0.0
        print(
            f"{workload:9s} streams {args.streams}: off {off['tok_s']:6.1f} tok/s, spec "
            f"{on['tok_s']:6.1f} tok/s ({on['tok_s'] / off['tok_s']:.2f}x), tokens/step "
            f"{on['tokens_per_step']:.2f}, accepted {on['accepted']}/{on['drafted']} "
            f"({100 * rate:.0f}%), identical {off['outputs'] == on['outputs']}"
        )
    if args.peer_binary:
        peer_rows(args, res)


if __name__ == "__main__":
    main()
