"""Closed-loop load generator for any OpenAI-compatible server (tokenmill, vLLM, llama-server).

    .venv/bin/python benchmarks/serving.py --concurrency 1 4 16 64 --prompt-tokens 250 \
        --max-tokens 128 [--base-url http://127.0.0.1:8000/v1] [--chat] [--duration 60]

At each concurrency C, C workers each send their next streaming request as soon as their previous
one ends, until --num-requests (default max(8, 2*C)) have been sent or --duration has passed.
Prompts are seeded random words and numbers, unique from the first block on, so a prefix cache
cannot help. Requests use temperature 0 and ignore_eos, so each one generates max_tokens tokens;
actual counts come from the usage chunk (stream_options.include_usage), else from counting chunks.

Metrics per level: TTFT = send → first chunk with text. ITL = gap between consecutive chunks with
text, one sample per chunk (a chunk carrying k tokens is one gap, not k). TPOT = (e2e - TTFT) /
(output_tokens - 1) per request, the per-token figure that is right even for multi-token chunks.
Throughput = tokens of successful requests / level wall time (first send → last response end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np

WORDS = (
    "river mountain engine quiet orange seven paper window garden silver thunder market lantern "
    "copper harbor violet meadow canyon ribbon falcon pepper marble winter saddle forest candle "
    "bridge planet rocket island velvet anchor basket cotton dragon feather glacier hammer jungle "
    "kettle ladder mirror needle oyster pillow quartz rabbit shadow tunnel umbrella valley walnut "
    "yellow zebra almond breeze cactus dolphin ember fossil gravel hollow indigo jacket kernel "
    "lemon magnet nectar orbit pebble quiver raven sparrow timber velvet wander yonder zephyr"
).split()


@dataclass(slots=True)
class RequestResult:
    """What one streamed request measured (times in seconds from its send)."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_reported: bool = False
    done: bool = False
    itls: list[float] = field(default_factory=list)


@dataclass(slots=True)
class RunConfig:
    """Everything a request needs besides its prompt."""

    url: str
    model: str
    chat: bool
    max_tokens: int
    request_timeout: float
    extra_body: dict


def make_prompt(rng: random.Random, num_words: int) -> str:
    """Seeded random words, every third with a number: prompts differ from the first token."""
    words = [rng.choice(WORDS).capitalize() + str(rng.randint(0, 999))]
    for i in range(num_words - 1):
        word = rng.choice(WORDS)
        words.append(f"{word} {rng.randint(0, 99)}" if i % 3 == 2 else word)
    return " ".join(words)


async def count_tokens(client: httpx.AsyncClient, root: str, model: str, text: str) -> int | None:
    """Prompt length by the server's /tokenize (vLLM/tokenmill or llama-server shape), else None."""
    for body in ({"model": model, "prompt": text}, {"content": text}):
        try:
            r = await client.post(f"{root}/tokenize", json=body, timeout=10.0)
        except httpx.HTTPError:
            return None
        if r.status_code == 200:
            data = r.json()
            count = data.get("count", len(data.get("tokens") or []))
            # NOTE: llama-server answers the vLLM shape with 200 and no tokens (it reads only
            # "content"), so an empty count means "wrong shape", not "empty text".
            if count:
                return int(count)
    return None


async def words_for_tokens(client: httpx.AsyncClient, root: str, model: str, target: int) -> int:
    """Calibrate the word count that gives ~target prompt tokens (2 tokens/word if no /tokenize)."""
    rng = random.Random(-1)
    probe = 200
    counts = [await count_tokens(client, root, model, make_prompt(rng, probe)) for _ in range(3)]
    if any(c is None for c in counts):
        print("note: no /tokenize on the server; approximating prompt tokens from words")
        return max(2, round(target / 2.0))
    return max(2, round(target * probe / (sum(counts) / len(counts))))


async def send(
    client: httpx.AsyncClient, cfg: RunConfig, prompt: str, deadline: float
) -> RequestResult:
    """Send one streaming request and time its chunks; give up at the run's deadline."""
    res = RequestResult()
    body: dict = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **cfg.extra_body,
    }
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    num_chunks = 0
    start = time.perf_counter()
    last = start
    timeout = max(0.1, min(cfg.request_timeout, deadline - start))
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", cfg.url, json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    res.error = f"HTTP {r.status_code}: {text[:200]}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments (":ping"), "event:" lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        res.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                        return res
                    if chunk.get("usage"):
                        res.usage_reported = True
                        res.output_tokens = int(chunk["usage"].get("completion_tokens", 0))
                        res.prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
                    choices = chunk.get("choices") or []
                    if cfg.chat:
                        text = "".join((c.get("delta") or {}).get("content") or "" for c in choices)
                    else:
                        text = "".join(c.get("text") or "" for c in choices)
                    if not text:
                        continue
                    now = time.perf_counter()
                    if num_chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    num_chunks += 1
    except TimeoutError:
        res.error = f"timeout after {timeout:.1f} s"
        return res
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.e2e = time.perf_counter() - start
    if not res.usage_reported:
        res.output_tokens = num_chunks
    if num_chunks == 0:
        res.error = "stream ended without any text chunk"
        return res
    res.ok = True
    return res


def pct(values: list[float], q: float) -> float:
    """Percentile in milliseconds (nan when there are no samples)."""
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(concurrency: int, results: list[RequestResult], wall: float, cfg: RunConfig) -> dict:
    """One level's row: throughput, latency percentiles, error and anomaly counts."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wall_s": wall,
        "request_throughput": len(ok) / wall if wall else 0.0,
        "output_throughput": out_tokens / wall if wall else 0.0,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else 0.0,
        "short_outputs": sum(r.output_tokens != cfg.max_tokens for r in ok),
        "missing_usage": sum(not r.usage_reported for r in ok),
        "missing_done": sum(not r.done for r in ok),
        **{f"ttft_p{q}_ms": pct(ttfts, q) for q in (50, 90, 99)},
        **{f"itl_p{q}_ms": pct(itls, q) for q in (50, 90, 99)},
        "tpot_p50_ms": pct(tpots, 50),
        "e2e_p50_ms": pct([r.e2e for r in ok], 50),
    }


async def run_level(
    client: httpx.AsyncClient,
    cfg: RunConfig,
    prompts: Iterator[str],
    concurrency: int,
    end_by: float,
    deadline: float,
) -> tuple[list[RequestResult], float]:
    """Closed loop: each of `concurrency` workers sends its next prompt when its last one ends."""
    results: list[RequestResult] = []
    todo = iter(prompts)

    async def worker() -> None:
        for prompt in todo:  # a shared iterator: each prompt goes to exactly one worker
            if time.perf_counter() >= end_by:
                return
            results.append(await send(client, cfg, prompt, deadline))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def resolve_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model id that GET /v1/models lists."""
    r = await client.get(f"{base_url}/models", timeout=10.0)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def bench(args: argparse.Namespace) -> dict:
    """Warm up, then run each concurrency level within the overall deadline."""
    deadline = time.perf_counter() + args.deadline
    base = args.base_url.rstrip("/")
    root = base.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = args.model or await resolve_model(client, base)
        num_words = await words_for_tokens(client, root, model, args.prompt_tokens)
        path = "/chat/completions" if args.chat else "/completions"
        cfg = RunConfig(
            f"{base}{path}",
            model,
            args.chat,
            args.max_tokens,
            args.request_timeout,
            args.extra_body,
        )
        # NOTE: flushed: through a pipe (compare.py's callers, its test) the load's start shows
        # when it happens, not when the whole run ends
        print(
            f"model {model} at {cfg.url}; {num_words} words/prompt for "
            f"~{args.prompt_tokens} tokens",
            flush=True,
        )
        rng = random.Random(args.seed)
        levels = []
        for c in args.concurrency:
            if time.perf_counter() >= deadline:
                print(
                    f"overall deadline of {args.deadline:.0f} s reached; skipping concurrency {c}"
                )
                break
            warm_cfg = replace(cfg, max_tokens=min(16, cfg.max_tokens))
            warm = await send(client, warm_cfg, make_prompt(rng, num_words), deadline)
            if not warm.ok:
                print(f"warm-up failed at concurrency {c}: {warm.error}")
            n = args.num_requests or (10**9 if args.duration else max(8, 2 * c))
            end_by = min(deadline, time.perf_counter() + (args.duration or args.deadline))
            # NOTE: prompts are made lazily, so a --duration run does not build 10**9 of them.
            prompts = (make_prompt(rng, num_words) for _ in range(n))
            results, wall = await run_level(client, cfg, prompts, c, end_by, deadline)
            row = summarize(c, results, wall, cfg)
            # NOTE: per-request rows without their ITL lists, to keep the JSON small.
            row["results"] = [asdict(r) | {"itls": len(r.itls)} for r in results]
            levels.append(row)
            print(
                f"concurrency {c}: {row['completed']}/{row['requests']} ok in {wall:.1f} s, "
                f"{row['output_throughput']:.1f} tok/s",
                flush=True,
            )
    return {
        "base_url": base,
        "model": model,
        "endpoint": path,
        "prompt_words": num_words,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"api_key": "***" if args.api_key else None},
        "levels": levels,
    }


def markdown_table(levels: list[dict]) -> str:
    """The per-level results as a markdown table."""
    cols = [
        ("C", "concurrency", "d"),
        ("ok", "completed", "d"),
        ("err", "errors", "d"),
        ("req/s", "request_throughput", ".2f"),
        ("out tok/s", "output_throughput", ".1f"),
        ("TTFT p50", "ttft_p50_ms", ".0f"),
        ("TTFT p90", "ttft_p90_ms", ".0f"),
        ("TTFT p99", "ttft_p99_ms", ".0f"),
        ("ITL p50", "itl_p50_ms", ".1f"),
        ("ITL p90", "itl_p90_ms", ".1f"),
        ("ITL p99", "itl_p99_ms", ".1f"),
        ("TPOT p50", "tpot_p50_ms", ".1f"),
        ("e2e p50", "e2e_p50_ms", ".0f"),
    ]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---:|" * len(cols)]
    for row in levels:
        lines.append("| " + " | ".join(format(row[k], f) for _, k, f in cols) + " |")
    return "\n".join(lines) + "\n(latencies in ms)"


def plot(report: dict, path: Path) -> None:
    """Throughput and latency against concurrency, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    cs = [r["concurrency"] for r in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(cs, [r["output_throughput"] for r in levels], "o-")
    for c, r in zip(cs, levels, strict=True):
        label = f"{r['request_throughput']:.2f} req/s"
        xy = (c, r["output_throughput"])
        ax1.annotate(label, xy, xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8)
    ax1.set_ylim(0, 1.15 * max([r["output_throughput"] for r in levels] + [1e-9]))
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("throughput")
    for key, label in [
        ("ttft_p50_ms", "TTFT p50"),
        ("ttft_p99_ms", "TTFT p99"),
        ("itl_p50_ms", "ITL p50"),
        ("itl_p99_ms", "ITL p99"),
        ("e2e_p50_ms", "e2e p50"),
    ]:
        ax2.plot(cs, [r[key] for r in levels], "o-", label=label)
    if any(r["e2e_p50_ms"] > 0 for r in levels):  # NaN compares False: no successes, no log
        ax2.set_yscale("log")
    ax2.set_ylabel("ms (log)")
    ax2.set_title("latency")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.grid(alpha=0.3)
    a = report["args"]
    fig.suptitle(
        f"{report['model']} {report['endpoint']}: ~{a['prompt_tokens']} prompt tokens, "
        f"{a['max_tokens']} output tokens",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; bad values exit with a message that names them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", default=None, help="default: first id from GET /v1/models")
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--num-requests", type=int, default=None, help="per level; max(8, 2*C)")
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per level; with --num-requests, the first to end",
    )
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=3600.0, help="seconds for the whole run")
    ap.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into requests")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="default: next to the JSON")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    for name in ("prompt_tokens", "max_tokens", "num_requests", "duration", "request_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if min(args.concurrency) < 1:
        ap.error(f"--concurrency values must be >= 1, got {args.concurrency}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table, write JSON and the plot; exit 1 if any request failed."""
    args = parse_args(argv)
    report = asyncio.run(bench(args))
    print()
    print(markdown_table(report["levels"]))
    for row in report["levels"]:
        for sample in row["error_samples"]:
            print(f"C={row['concurrency']} error: {sample}")
        if row["short_outputs"] or row["missing_usage"] or row["missing_done"]:
            print(
                f"C={row['concurrency']}: {row['short_outputs']} requests with output tokens != "
                f"max_tokens {args.max_tokens}, {row['missing_usage']} without a usage chunk, "
                f"{row['missing_done']} without data: [DONE]"
            )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.output or Path(__file__).parent / "results" / f"serving-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    if not args.no_plot and report["levels"]:
        png = args.plot or out.with_suffix(".png")
        plot(report, png)
        print(f"wrote {png}")
    return 1 if any(row["errors"] for row in report["levels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
