"""Embedding throughput: `tokenmill serve --runner pooling` against `llama-server --embeddings
--pooling last` on the same GGUF, one run, each server alone on the host.

    .venv/bin/python benchmarks/embeddings.py --peer-binary $PEER [MODEL.gguf]

256 seeded texts of ~128 tokens go to /v1/embeddings in requests of --batch texts, --concurrency
requests at a time (the same requests to both servers); the table gives texts/s and prompt
tokens/s (each server's own usage count), and the cosine between the two servers' vectors for
the same text (a check that both pooled the last token and normalized).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import Server, default_model, free_port  # noqa: E402

WORDS = (
    "river mountain engine quiet market signal garden copper winter letter bridge silver "
    "harbor lantern orchard planet record valley window yellow anchor basket candle desert "
    "feather glacier island jungle kettle ladder meadow needle ocean pepper"
).split()


def texts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def run(url: str, model: str, inputs: list[str], batch: int, concurrency: int):
    """All texts through /v1/embeddings: (seconds, prompt tokens, vectors in input order)."""
    batches = [inputs[i : i + batch] for i in range(0, len(inputs), batch)]
    out: list = [None] * len(batches)
    tokens = 0
    sem = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        async with sem:
            body = {"model": model, "input": batches[i], "encoding_format": "float"}
            r = await client.post(f"{url}/v1/embeddings", json=body)
            r.raise_for_status()
            data = r.json()
            out[i] = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
            tokens += data.get("usage", {}).get("prompt_tokens", 0)

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, 0)  # warm-up
        tokens = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(len(batches))))
        seconds = time.perf_counter() - t0
    return seconds, tokens, [v for b in out for v in b]


def measure(server: Server, model: str, args, inputs: list[str]):
    try:
        server.start(600)
        return asyncio.run(run(server.url, model, inputs, args.batch, args.concurrency))
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--peer-binary", required=True)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--words", type=int, default=100, help="~1.3 tokens a word")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokenmill-args", default="")
    args = ap.parse_args()
    model = str(Path(args.model or default_model()).resolve())
    logs = Path(__file__).resolve().parent / "results" / "embeddings"
    logs.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[1]
    tm_port, peer_port = free_port(), free_port()
    tm = Server(
        "tokenmill",
        [str(repo / ".venv/bin/tokenmill"), "serve", model, "--runner", "pooling",
         "--host", "127.0.0.1", "--port", str(tm_port), *args.tokenmill_args.split()],
        f"http://127.0.0.1:{tm_port}", logs / "tokenmill.log",
    )  # fmt: skip
    peer = Server(
        "llama-server",
        [args.peer_binary, "-m", model, "--embeddings", "--pooling", "last", "--host",
         "127.0.0.1", "--port", str(peer_port), "-t", "2", "-tb", "2", "-c", "32768",
         "--parallel", str(args.concurrency), "-b", "4096", "-ub", "4096", "--no-webui"],
        f"http://127.0.0.1:{peer_port}", logs / "llama-server.log",
    )  # fmt: skip
    inputs = texts(args.texts, args.words, 0)
    results = {}
    for server in (peer, tm):
        name = "tokenmill" if server is tm else "llama-server"
        results[name] = measure(server, Path(model).stem, args, inputs)
    from model.layers import kernels

    print(f"CPU: {kernels.cpu_name()}; {args.texts} texts of {args.words} words, batches of "
          f"{args.batch}, {args.concurrency} at a time")  # fmt: skip
    print("| server | seconds | texts/s | prompt tokens/s |")
    print("|---|---:|---:|---:|")
    for name, (sec, tok, _) in results.items():
        print(f"| {name} | {sec:.2f} | {args.texts / sec:.1f} | {tok / sec:.0f} |")
    a, b = results["tokenmill"][2], results["llama-server"][2]
    cos = [sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(a, b, strict=True)]
    ratio = results["llama-server"][0] / results["tokenmill"][0]
    print(f"tokenmill / llama-server throughput: {ratio:.2f}x; cosine of the two servers' "
          f"vectors: min {min(cos):.4f}, mean {sum(cos) / len(cos):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
