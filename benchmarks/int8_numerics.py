"""How far each path's greedy logprobs are from transformers float32, with llama-server in one run.

    PEER=$(../shared/tools/build-llama-server.sh)
    .venv/bin/python benchmarks/int8_numerics.py --peer-binary $PEER

For the four prompts of tests/model/test_smollm2_parity.py, 32 greedy steps each: tokenmill with
float32 activations (the exact path), tokenmill with int8 activations, and llama-server on the same
GGUF. Each engine's own tokens go through one teacher-forced transformers forward; the table gives,
per engine and prompt, the step where transformers' own greedy choice first differs, and the
largest and mean |logprob difference| of the chosen tokens, over all 32 steps and before that first
divergence (the two statements people make).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")  # the loader's progress bar would break the table
sys.path.insert(0, str(REPO))

from model.tokenizer import load_tokenizer  # noqa: E402
from scheduler.config import default_model_path  # noqa: E402

STEPS = 32
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def reference_model(gguf: str):
    """transformers' float32 model of the GGUF (tests' disk cache when a test built it)."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    return conftest.smollm2_hf_reference.__wrapped__(gguf)


def tokenmill_runs(gguf: str, prompts: list[list[int]], act: str) -> list[tuple[list, list]]:
    from model.sampling_params import SamplingParams
    from scheduler.llm import LLM

    llm = LLM(gguf, kv_cache_memory=64 << 20, activation_dtype=act)
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    llm.shutdown()
    return [
        (list(o.outputs[0].token_ids), [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_runs(binary: str, gguf: str, prompts: list[list[int]]) -> list[tuple[list, list]]:
    port = free_port()
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-c", "4096"]
    log_path = REPO / "benchmarks/results/int8-numerics-llama.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core host takes minutes to warm up
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("llama-server did not start")
            time.sleep(0.5)
        runs = []
        for ids in prompts:
            body = {
                "prompt": ids, "n_predict": STEPS, "temperature": 0, "n_probs": 1,
                "cache_prompt": False, "ignore_eos": True, "samplers": ["top_k"], "top_k": 1,
            }  # fmt: skip
            r = httpx.post(url + "/completion", json=body, timeout=300).json()
            probs = r["completion_probabilities"]
            runs.append(([p["id"] for p in probs], [p["logprob"] for p in probs]))
        return runs
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def score(model, ids: list[int], tokens: list[int], logprobs: list[float]) -> dict:
    with torch.inference_mode():
        ref = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float()
    ref_lp = torch.log_softmax(ref, dim=-1)
    greedy = ref.argmax(-1).tolist()
    first = next((k for k in range(len(tokens)) if greedy[k] != tokens[k]), len(tokens))
    diffs = [
        abs(lp - float(ref_lp[k, t]))
        for k, (t, lp) in enumerate(zip(tokens, logprobs, strict=True))
    ]
    before = diffs[:first] or [0.0]
    return {
        "first_divergence": first,
        "max_all": max(diffs),
        "mean_all": sum(diffs) / len(diffs),
        "max_before": max(before),
        "mean_before": sum(before) / len(before),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--peer-binary", help="llama-server; omitted: tokenmill only")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/int8-numerics.json"))
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    prompts = [tok.apply_chat_template(CHAT)] + [tok.encode(p) for p in PROMPTS]
    model = reference_model(args.model)
    engines = {
        "tokenmill float32": lambda: tokenmill_runs(args.model, prompts, "float32"),
        "tokenmill int8": lambda: tokenmill_runs(args.model, prompts, "int8"),
    }
    if args.peer_binary:
        engines["llama-server"] = lambda: llama_runs(args.peer_binary, args.model, prompts)
    from model.layers import kernels

    print(f"CPU: {kernels.cpu_name()}; int8 path: {kernels.int8_isa(kernels.load())}")
    print("| engine | prompt | first divergence | max / mean all 32 | max / mean before it |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for name, run in engines.items():
        results[name] = []
        for i, (tokens, logprobs) in enumerate(run()):
            s = score(model, prompts[i], tokens, logprobs)
            results[name].append(s)
            print(
                f"| {name} | {i} | {s['first_divergence']} | {s['max_all']:.3f} / "
                f"{s['mean_all']:.3f} | {s['max_before']:.3f} / {s['mean_before']:.3f} |"
            )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
