"""Every GPU check in one run (< 10 min on one GPU), printed as one table.

    python benchmarks/gpu_checks.py --tokenizer DIR [--device cuda] [--quick]

1. Exactness against transformers on the same device: float32 (tight) and bfloat16 (looser,
   stated) for random Llama, Qwen2 and a SmolLM2-shaped model; greedy 32 tokens after 4 prompts.
   Each of our greedy tokens is teacher-forced through transformers: its logprob must agree
   within the tolerance, and where transformers' own argmax differs the two must be a near-tie
   (gap within the tolerance), vLLM's `check_logprobs_close` rule.
2. CUDA graphs against eager (`enforce_eager`): identical greedy tokens at 1, 5, 16 and 64
   sequences (float32), and the bfloat16 match count.
3. Decode speed, graphs vs eager, bfloat16: SmolLM2-shaped and 1B-shaped random models,
   1/16/64 streams of 128 tokens.
4. With --serve: `tokenmill serve` on the device, float32, with graphs and with --enforce-eager:
   16 concurrent greedy completions (identical text), a chat stream with usage, /metrics.

Random weights: the host has no model hub; the tokenizer folder (SmolLM2's) only names tokens.
`--device cpu --quick` is a dry run of the same code (no graphs on CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.sampling_params import SamplingParams  # noqa: E402
from scheduler.llm import LLM  # noqa: E402

TOL = {"float32": 2e-3, "bfloat16": 0.25}  # logprob agreement with transformers (stated)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.1)  # fmt: skip
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, initializer_range=0.05)  # fmt: skip
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, initializer_range=0.02)  # fmt: skip
rows: list[tuple[str, str, str]] = []


def report(check: str, figure: str, ok: bool | None) -> None:
    verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    rows.append((check, figure, verdict))
    print(f"  {verdict:4}  {check}: {figure}", flush=True)


def build(out: Path, tokenizer: Path, arch: str, dims: dict, tie: bool, device: str) -> Path:
    """A random transformers checkpoint (safetensors, float32) plus the tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(dims, vocab_size=49152, tie_word_embeddings=tie, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=2048)  # fmt: skip
    qwen = arch == "qwen2"
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if qwen else (LlamaForCausalLM, LlamaConfig)
    with torch.device(device):
        model = cls(cfg(**common, rope_theta=10000.0)).float()
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    return out


def prompts(n: int, lengths: tuple[int, ...] = (5, 37, 64, 130)) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, 49152, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]  # fmt: skip


def greedy(llm: LLM, ps: list[list[int]], max_tokens: int, logprobs: bool = False):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=0 if logprobs else None)  # fmt: skip
    return [o.outputs[0] for o in llm.generate(ps, params)]


def exactness(folder: Path, dtype: str, device: str, max_tokens: int) -> tuple[str, bool]:
    """Our greedy tokens teacher-forced through transformers (same device and dtype)."""
    from transformers import AutoModelForCausalLM

    llm = LLM(str(folder), device=device, dtype=dtype, kv_cache_memory="512MiB")
    ps = prompts(4)
    outs = greedy(llm, ps, max_tokens, logprobs=True)
    llm.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
    worst_lp = worst_tie = 0.0
    same = total = 0
    for p, out in zip(ps, outs, strict=True):
        ids = torch.tensor([p + out.token_ids], device=device)
        with torch.no_grad():
            lp = hf(ids).logits[0, len(p) - 1 : -1].float().log_softmax(-1)  # [max_tokens, vocab]
        for j, (tok, ours) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            worst_lp = max(worst_lp, abs(lp[j, tok].item() - ours.logprob))
            best = int(lp[j].argmax())
            same += best == tok
            worst_tie = max(worst_tie, lp[j, best].item() - lp[j, tok].item())
            total += 1
    del hf
    tol = TOL[dtype]
    figure = (f"greedy {same}/{total} identical, max abs dlogprob {worst_lp:.2e}, "
              f"max tie gap {worst_tie:.2e} (tol {tol:g})")  # fmt: skip
    return figure, worst_lp <= tol and worst_tie <= tol


def graphs_vs_eager(
    folder: Path, dtype: str, device: str, max_tokens: int
) -> tuple[str, bool, int]:
    """Greedy tokens with CUDA graphs and with enforce_eager, at several batch sizes:
    (figure, every sequence identical, graphs captured)."""
    results = {}
    for eager in (True, False):
        llm = LLM(str(folder), device=device, dtype=dtype, kv_cache_memory="1GiB",
                  enforce_eager=eager)  # fmt: skip
        results[eager] = {n: [o.token_ids for o in greedy(llm, prompts(n), max_tokens)]
                          for n in (1, 5, 16, 64)}  # fmt: skip
        graphs = llm.engine.runner.graphs
        captured = 0 if graphs is None else len(graphs.graphs)
        llm.shutdown()
    pairs = [
        (a, b)
        for n in results[True]
        for a, b in zip(*(r[n] for r in results.values()), strict=True)
    ]
    same = sum(a == b for a, b in pairs)
    figure = f"{same}/{len(pairs)} sequences identical, {captured} graphs captured"
    return figure, same == len(pairs), captured


def speed(folder: Path, name: str, device: str, streams: tuple[int, ...], tokens: int) -> None:
    """Decode tok/s, bfloat16, graphs vs eager, same prompts (32 tokens each)."""
    figures = {}
    for eager in (True, False):
        llm = LLM(str(folder), device=device, dtype="bfloat16" if device == "cuda" else "float32",
                  kv_cache_memory="4GiB" if device == "cuda" else "256MiB", enforce_eager=eager,
                  max_num_seqs=max(streams))  # fmt: skip
        for n in streams:
            greedy(llm, prompts(n, (32,)), tokens)  # warm-up: captures this shape's graphs
            t0 = time.perf_counter()
            outs = greedy(llm, prompts(n, (32,)), tokens)
            dt = time.perf_counter() - t0
            figures[eager, n] = sum(len(o.token_ids) for o in outs) / dt, dt / tokens * 1e3
        llm.shutdown()
    for n in streams:
        (e, e_ms), (g, g_ms) = figures[True, n], figures[False, n]
        report(f"speed {name} bf16 {n} streams x {tokens} tokens",
               f"eager {e:.0f} tok/s ({e_ms:.1f} ms/step), graphs {g:.0f} tok/s "
               f"({g_ms:.1f} ms/step): {g / e:.2f}x", None)  # fmt: skip


def serve_check(folder: Path, device: str) -> None:
    """The HTTP server on the device, graphs then eager: same greedy text, a stream, metrics."""
    import concurrent.futures
    import json
    import subprocess

    import httpx

    base, texts = "http://127.0.0.1:8123", {}
    for eager in (False, True):
        args = [sys.executable, "-m", "server", "serve", str(folder), "--device", device,
                "--dtype", "float32", "--port", "8123", "--served-model-name", "m",
                "--log-level", "warning"] + (["--enforce-eager"] if eager else [])  # fmt: skip
        proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1])
        try:
            deadline = time.monotonic() + 240
            while not _healthy(base):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not come up (exit {proc.poll()})")
                time.sleep(0.5)  # NOTE: polling a starting process, not synchronisation

            def complete(i: int) -> str:
                body = dict(model="m", prompt=f"Once upon a time number {i}", max_tokens=48,
                            temperature=0)  # fmt: skip
                r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
                r.raise_for_status()
                return r.json()["choices"][0]["text"]

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                texts[eager] = list(pool.map(complete, range(16)))
            dt = time.perf_counter() - t0
            body = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                        temperature=0, stream=True,
                        stream_options={"include_usage": True})  # fmt: skip
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines()
                          if line.startswith("data: {")]  # fmt: skip
            usage = chunks[-1]["usage"]["completion_tokens"]
            metrics = "tokenmill_num_requests_running" in httpx.get(f"{base}/metrics").text
        finally:
            proc.terminate()
            code = proc.wait(30)
        mode = "eager" if eager else "graphs"
        report(f"serve {mode} float32", f"16 completions x 48 tokens in {dt:.2f} s, stream "
               f"{len(chunks)} chunks (usage {usage}), metrics {metrics}, exit {code}",
               usage == 20 and metrics and code == 0)  # fmt: skip
    same = sum(a == b for a, b in zip(texts[False], texts[True], strict=True))
    report("serve graphs vs eager", f"{same}/16 greedy completions identical", same == 16)


def _healthy(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def guarded(check: str, run, *args) -> None:
    """A check that raises is a FAIL row with its error; the others still run."""
    try:
        run(*args)
    except Exception as e:
        traceback.print_exc()
        report(check, f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}", False)


def exact_report(check: str, folder: Path, dtype: str, device: str, steps: int) -> None:
    report(check, *exactness(folder, dtype, device, steps))


def graphs_report(check: str, folder: Path, dtype: str, device: str, steps: int) -> None:
    figure, identical, captured = graphs_vs_eager(folder, dtype, device, steps)
    must = dtype == "float32" and device == "cuda"  # bfloat16: reported, not required
    report(check, figure, identical and captured > 0 if must else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="HF tokenizer folder")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and no 1B (a dry run)")
    ap.add_argument("--serve", action="store_true", help="also check `tokenmill serve` (HTTP)")
    args = ap.parse_args()
    dev, quick = args.device, args.quick
    steps = 8 if quick else 32
    if dev == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {
            "llama": build(root / "llama", args.tokenizer, "llama", TINY, False, dev),
            "qwen2-tied": build(root / "qwen2", args.tokenizer, "qwen2", TINY, True, dev),
            "smollm2-shape": build(root / "smol", args.tokenizer, "llama", SMOLLM2, True, dev),
        }
        for name, folder in models.items():
            for dtype in ("float32", "bfloat16"):
                check = f"exact {name} {dtype} vs transformers"
                guarded(check, exact_report, check, folder, dtype, dev, steps)
        smol = models["smollm2-shape"]
        for dtype in ("float32", "bfloat16"):
            check = f"graphs vs eager smollm2-shape {dtype}"
            guarded(check, graphs_report, check, smol, dtype, dev, steps)
        if args.serve:
            guarded("serve", serve_check, smol, dev)
        streams = (1, 4) if quick else (1, 16, 64)
        guarded("speed smollm2-shape", speed, smol, "smollm2-shape", dev, streams, steps * 4)
        if not quick:
            big = build(root / "llama1b", args.tokenizer, "llama", LLAMA_1B, True, dev)
            guarded("speed llama-1b-shape", speed, big, "llama-1b-shape", dev, streams, 128)
    print("\n| check | figure | verdict |\n|---|---|---|")
    for check, figure, verdict in rows:
        print(f"| {check} | {figure} | {verdict} |")
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    sys.exit(1 if any(v == "FAIL" for _, _, v in rows) else 0)


if __name__ == "__main__":
    main()
