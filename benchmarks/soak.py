"""Soak test: mixed, partly hostile traffic against a live server, then a strict accounting.

    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 600 \
        [--concurrency 8] [--api-key KEY] [--seed 0] [--max-n 16] [--warmup 120]

Traffic: completions and chat, streamed and not, random prompt lengths and max_tokens, n > 1,
batched prompts, ~10% clients that vanish (mid-stream, or before a non-streamed answer), ~5% bad
requests (400) and ~5% over the server's limits (400/413). Afterwards it checks that:
- every request is counted exactly once in /metrics (tokenmill_http_requests by route and
  status, matching what the clients saw; a vanished client shows as 200 or 499),
- no request got a 5xx, and no engine request finished with an error,
- the engine is idle and every KV block is free,
- the server's RSS (process_resident_memory_bytes) grew less than 5% after the warm-up.
tests/e2e/test_soak.py runs it for 60 s against the tiny checkpoint as part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from benchmarks.compare import Server

ROUTES = ("/v1/completions", "/v1/chat/completions")
FILL_PROMPT_TOKENS = 512
WORDS = "the a river stone light north paper seven quiet orange signal market".split()


@dataclass
class SoakReport:
    duration_s: float
    sent: Counter = field(default_factory=Counter)  # route -> requests sent
    seen: Counter = field(default_factory=Counter)  # (route, status) the clients saw
    vanished: Counter = field(default_factory=Counter)  # route -> clients that left early
    counted: Counter = field(default_factory=Counter)  # (route, status) /metrics delta
    finished: Counter = field(default_factory=Counter)  # finished_reason -> engine requests
    engine_requests_done: int = 0  # prompts of requests the clients saw complete
    engine_requests_vanished: int = 0  # prompts of vanished requests (may or may not run)
    rss_start: float = 0.0
    rss_end: float = 0.0
    timeouts: int = 0  # clients that gave up after request_timeout_s (also in `vanished`)
    kv_fill_tokens: int = 0  # prompt tokens of the fill before the traffic (not audited)
    kv_fill_s: float = 0.0
    rss_trace: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MiB)
    stats_end: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "duration_s": round(self.duration_s, 1),
            "kv_fill_tokens_s": (self.kv_fill_tokens, round(self.kv_fill_s, 1)),
            "requests": sum(self.sent.values()),
            "statuses": dict(Counter(s for (_, s), n in self.seen.items() for _ in range(n))),
            "vanished": sum(self.vanished.values()),
            "client_timeouts": self.timeouts,
            "engine_finished": dict(self.finished),
            "rss_mb_start_end": (round(self.rss_start / 2**20, 1), round(self.rss_end / 2**20, 1)),
            "rss_growth_pct": round(100 * (self.rss_end / max(self.rss_start, 1) - 1), 2),
            "rss_mib_trace": " ".join(f"{t}s:{mib:.0f}" for t, mib in self.rss_trace),
            "free_blocks": (
                self.stats_end.get("num_free_blocks"),
                self.stats_end.get("num_total_blocks"),
            ),  # fmt: skip
            "problems": self.problems,
        }


def scrape(url: str, headers: dict) -> tuple[Counter, Counter, float]:
    """(http responses by (route, status), engine requests by finished_reason, RSS bytes)."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    http, finished, rss = Counter(), Counter(), 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tokenmill_http_requests_total":
                http[(s.labels["route"], int(s.labels["status"]))] += int(s.value)
            elif s.name == "tokenmill_requests_finished_total":
                finished[s.labels["finished_reason"]] += int(s.value)
            elif s.name == "process_resident_memory_bytes":
                rss = s.value
    return http, finished, rss


def fill_kv_cache(
    url: str, headers: dict, block_size: int = 16, concurrency: int = 8, seed: int = 0
) -> int:
    """Prefill unique prompts totalling the whole KV pool, so that every block has been written.

    NOTE: on CPU the KV cache is zero pages that become resident when first written, and the
    block manager hands out never-used blocks first: without this, RSS climbs to the full cache
    over the first minutes (measured: ~1.4 -> 2.0 GiB on the default model), which is the
    configured cache paging in, not a leak. Returns the number of prompt tokens sent.
    """
    total = httpx.get(f"{url}/stats", headers=headers, timeout=30).json()["num_total_blocks"]
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    max_len = models[0].get("max_model_len") or 2048
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(str(rng.randrange(10**6)) for _ in range(words))

    probe = httpx.post(f"{url}/tokenize", json={"prompt": text(100)}, headers=headers, timeout=30)
    per_word = probe.json()["count"] / 100
    # NOTE: short prompts: prefill cost grows with context, and the block manager hands out
    # never-used blocks first, so many small prompts touch every block as surely as a few long
    # ones (measured: 7,000-token prompts prefilled at ~90 tokens/s on a busy 2-core machine)
    words = int(0.9 * min(FILL_PROMPT_TOKENS, max_len - 8) / per_word)  # margin: digits vary
    need = total * block_size
    prompts = [text(words) for _ in range(-(-need // int(words * per_word)) + 1)]

    def send(prompt: str) -> int:
        body = {"prompt": prompt, "max_tokens": 1}
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=600)
        resp.raise_for_status()
        return resp.json()["usage"]["prompt_tokens"]

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(send, prompts))


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))


def _request(rng: random.Random, max_n: int) -> tuple[str, dict, str, int]:
    """(route, body, kind, engine requests it makes) with kind ok | bad | limit | vanish."""
    route = rng.choice(ROUTES)
    stream = rng.random() < 0.5
    body: dict = {"max_tokens": rng.randint(1, 24), "stream": stream, "ignore_eos": True,
                  "temperature": rng.choice([0.0, 0.7]), "n": rng.choice([1, 1, 1, 2])}  # fmt: skip
    prompts = 1
    if route == "/v1/completions":
        if rng.random() < 0.15:
            prompts = 2
            body["prompt"] = [_prompt(rng), _prompt(rng)]
        else:
            body["prompt"] = _prompt(rng)
    else:
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
    roll = rng.random()
    if roll < 0.05:
        bad = {"temperature": "x", "n": -3, "max_tokens": [1], "stop": [1], "top_p": 7}
        key = rng.choice(sorted(bad))
        body[key] = bad[key]
        return route, body, "bad", 0
    if roll < 0.10:
        body["n"] = max_n + 1
        return route, body, "limit", 0
    if roll < 0.20:
        body["max_tokens"] = 200  # long enough to be mid-generation when the client leaves
        return route, body, "vanish", prompts
    return route, body, "ok", prompts


def _send(http: httpx.Client, url: str, route: str, body: dict, kind: str) -> int | None:
    """The status the client saw, or None when it left before the answer ended."""
    if kind == "vanish":
        if body["stream"]:
            with http.stream("POST", f"{url}{route}", json=body) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        return None  # leave after the first chunk
            return None
        try:
            http.post(f"{url}{route}", json=body, timeout=0.2)
        except httpx.TimeoutException:
            return None
        return None
    resp = http.post(f"{url}{route}", json=body)
    if body.get("stream") and resp.status_code == 200:
        events = [ln[6:] for ln in resp.text.splitlines() if ln.startswith("data: ")]
        # NOTE: parsed, not grepped: a generated token may well be the word "error"
        if (
            not events
            or events[-1] != "[DONE]"
            or any("error" in json.loads(e) for e in events[:-1])
        ):
            raise AssertionError(f"bad stream: {resp.text[-300:]}")
    elif resp.status_code != 200:
        err = resp.json().get("error", {})
        if set(err) != {"message", "type", "param", "code"}:
            raise AssertionError(f"not an OpenAI error: {resp.text[:300]}")
    return resp.status_code


def run_soak(
    url: str,
    duration_s: float,
    concurrency: int = 8,
    seed: int = 0,
    api_key: str | None = None,
    max_n: int = 16,
    warmup_s: float | None = None,
    rss_every_s: float = 60.0,
    fill_kv: bool = True,
    block_size: int = 16,
    request_timeout_s: float = 120.0,
) -> SoakReport:
    """Drive traffic for `duration_s`, then account for every request; problems are listed."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = SoakReport(duration_s)
    lock = threading.Lock()
    if fill_kv:
        t0 = time.monotonic()
        report.kv_fill_tokens = fill_kv_cache(url, headers, block_size, concurrency, seed)
        report.kv_fill_s = time.monotonic() - t0
    http_before, finished_before, _ = scrape(url, headers)
    warmup = warmup_s if warmup_s is not None else min(30.0, duration_s * 0.2)
    t_start = time.monotonic()
    end = t_start + duration_s
    rss_marked = threading.Event()

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(headers=headers, timeout=request_timeout_s) as http:
            while time.monotonic() < end:
                if not rss_marked.is_set() and time.monotonic() - t_start > warmup:
                    with lock:
                        if not rss_marked.is_set():
                            report.rss_start = scrape(url, headers)[2]
                            rss_marked.set()
                route, body, kind, prompts = _request(rng, max_n)
                try:
                    status = _send(http, url, route, body, kind)
                except httpx.TimeoutException as e:
                    if kind not in ("ok", "vanish"):  # refusals must be quick
                        with lock:
                            report.sent[route] += 1
                            report.problems.append(f"{route} {kind}: timed out: {e}")
                        continue
                    # NOTE: a client that gave up is a vanished client (the server sees a
                    # disconnect); counted apart, as a slow server is worth knowing about
                    status = None
                    with lock:
                        report.timeouts += 1
                except Exception as e:  # noqa: BLE001 - a broken answer is a finding
                    with lock:
                        report.sent[route] += 1
                        report.problems.append(f"{route} {kind}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    report.sent[route] += 1
                    if status is None:
                        report.vanished[route] += 1
                        report.engine_requests_vanished += prompts
                    else:
                        report.seen[(route, status)] += 1
                        if status == 200:
                            report.engine_requests_done += prompts
                        expected = {"ok": {200}, "bad": {400}, "limit": {400, 413}}[kind]
                        if status not in expected:
                            report.problems.append(f"{route} {kind}: status {status}")

    def sample_rss() -> None:  # a trace shows growth to a plateau apart from a steady leak
        while not done.wait(rss_every_s):
            rss = scrape(url, headers)[2]
            report.rss_trace.append((round(time.monotonic() - t_start), round(rss / 2**20, 1)))

    done = threading.Event()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    sampler = threading.Thread(target=sample_rss, daemon=True)
    for t in [*threads, sampler]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    _settle(url, headers, report, http_before, finished_before)
    return report


def _settle(
    url: str, headers: dict, report: SoakReport, http_before: Counter, finished_before: Counter
) -> None:
    """Wait for the engine to go idle, then compare /metrics with what the clients saw."""
    deadline = time.monotonic() + 60
    while True:
        stats = httpx.get(f"{url}/stats", headers=headers, timeout=30).json()
        if stats["num_running"] + stats["num_waiting"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    report.stats_end = stats
    http_after, finished_after, report.rss_end = scrape(url, headers)
    # the scrapes themselves are GETs on /metrics and /stats: only generation routes are audited
    report.counted = Counter(
        {k: v - http_before.get(k, 0) for k, v in http_after.items() if k[0] in ROUTES}
    )
    report.counted = +report.counted
    report.finished = +Counter(
        {k: v - finished_before.get(k, 0) for k, v in finished_after.items()}
    )
    p = report.problems
    if stats["num_running"] + stats["num_waiting"]:
        p.append(f"engine not idle after 60 s: {stats}")
    if stats["num_free_blocks"] != stats["num_total_blocks"]:
        p.append(f"blocks leaked: {stats['num_free_blocks']} of {stats['num_total_blocks']} free")
    for route in ROUTES:
        counted = sum(v for (r, _), v in report.counted.items() if r == route)
        if counted != report.sent[route]:
            p.append(f"{route}: {report.sent[route]} sent but {counted} in /metrics")
        seen = {s: v for (r, s), v in report.seen.items() if r == route}
        got = {s: v for (r, s), v in report.counted.items() if r == route}
        for status in set(seen) | set(got):
            if status in (200, 499):
                continue
            if seen.get(status, 0) != got.get(status, 0):
                p.append(
                    f"{route} {status}: seen {seen.get(status, 0)}, counted {got.get(status, 0)}"
                )
        ok = got.get(200, 0) + got.get(499, 0)
        if ok != seen.get(200, 0) + report.vanished[route]:
            vanished = report.vanished[route]
            p.append(f"{route}: 200+499 counted {ok} != seen 200 {seen.get(200, 0)} + {vanished}")
    fives = {k: v for k, v in report.counted.items() if k[1] >= 500}
    if fives:
        p.append(f"5xx answers: {fives}")
    done = sum(report.finished.values())
    low, high = (
        report.engine_requests_done,
        report.engine_requests_done + report.engine_requests_vanished,
    )
    if not low <= done <= high:
        p.append(f"engine requests finished {done} not in [{low}, {high}]")
    if report.finished.get("error"):
        p.append(f"{report.finished['error']} engine requests failed")
    if report.rss_start and report.rss_end > report.rss_start * 1.05:
        p.append(f"RSS grew {report.rss_start / 2**20:.0f} -> {report.rss_end / 2**20:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--max-n", type=int, default=16, help="the server's --max-n")
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of traffic before the RSS baseline (default: 20%% of --duration, <= 30)",
    )
    ap.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds before a client gives up"
    )
    ap.add_argument("--block-size", type=int, default=16, help="the server's --block-size")
    ap.add_argument(
        "--no-fill-kv",
        dest="fill_kv",
        action="store_false",
        help="skip writing the whole KV pool once before the traffic (see fill_kv_cache)",
    )
    ap.add_argument("--rss-every", type=float, default=60.0, help="seconds between RSS samples")
    ap.add_argument(
        "--serve",
        metavar="ARGS",
        default=None,
        help="start `tokenmill serve ARGS` on 127.0.0.1 (a free port) for the run and stop it "
        "after (--url is then ignored); '' serves the default model",
    )
    args = ap.parse_args(argv)
    server = None
    if args.serve is not None:
        # SIGTERM unwinds through the `finally` below, so the server is stopped too
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        server = _start_server(args.serve)
        args.url = server.url
    try:
        report = run_soak(
            args.url,
            args.duration,
            args.concurrency,
            args.seed,
            args.api_key,
            args.max_n,
            args.warmup,
            args.rss_every,
            args.fill_kv,
            args.block_size,
            args.request_timeout,
        )
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(report.summary(), indent=2))
    return 1 if report.problems else 0


def _start_server(args: str) -> Server:
    """compare.py's Server: own process group, bounded start-up, SIGTERM then SIGKILL."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare import Server, free_port

    url = f"http://127.0.0.1:{(port := free_port())}"
    cmd = [sys.executable, "-m", "server", "serve", *shlex.split(args)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    server = Server("tokenmill", cmd, url, log)
    server.start(timeout=600)
    print(f"server log: {log}", file=sys.stderr, flush=True)
    return server


if __name__ == "__main__":
    sys.exit(main())
