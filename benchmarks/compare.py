"""tokenmill vs llama-server on one GGUF, one host, one run: the comparison table of issue 8.

    .venv/bin/python benchmarks/compare.py [MODEL.gguf] --peer-binary PATH/llama-server \
        [--concurrency 1 4 16 64] [--prompt-tokens 256] [--max-tokens 128] [--order both]

MODEL defaults to the SmolLM2 GGUF that `tokenmill serve` loads. Each server is started here, on
127.0.0.1, measured with `serving.py`'s closed-loop streaming load (temperature 0, ignore_eos, the
same seeded prompts for both), and stopped before the other one starts: the two never share the
CPUs or the memory, so neither's idle threads, page cache pressure or resident weights weigh on
the other.
`--order both` runs two passes in opposite orders (peer first, then tokenmill first) and prints each
cell as the range over the passes, so a drift of the host shows up as a range, not as a ratio.

tokenmill runs as `make serve` does (`tokenmill serve MODEL`, its defaults) plus
`--tokenmill-args`; llama-server runs in the reference configuration of the issue
(`--parallel 16 -c 16384 --cont-batching -t 2 -tb 2 --no-webui --metrics`) plus `--peer-args`.
Peak RSS is the sum of VmHWM (the kernel's high-water mark) over the server's live process tree
(tokenmill's TP workers included), read after the last level; mapped GGUF pages count for both.
Without `--peer-binary` only tokenmill is measured. Servers are always stopped on exit, on Ctrl-C
and on SIGTERM (their whole process group: SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # noqa: E402  (the load generator next to this file)

REPO = Path(__file__).resolve().parents[1]
PEER_ARGS = [
    "--parallel", "16", "-c", "16384", "--cont-batching", "-t", "2", "-tb", "2",
    "--no-webui", "--metrics",
]  # fmt: skip
NAMES = {"peer": "llama-server", "tokenmill": "tokenmill"}


@dataclass
class Server:
    """One server process started here; its output goes to `log_path`."""

    name: str
    cmd: list[str]
    url: str
    log_path: Path
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0
    hwm: dict[int, int] = field(default_factory=dict)  # pid → VmHWM bytes

    def start(self, timeout: float) -> None:
        """Launch and poll /health until 200; the start-up is bounded by `timeout` seconds."""
        t0 = time.monotonic()
        self.hwm = {}
        with open(self.log_path, "ab") as log:
            # NOTE: own session, so Ctrl-C in the terminal reaches only us and we stop the whole
            # group (TP workers too) in order.
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        print(f"starting {self.name} (pid {self.proc.pid}): {shlex.join(self.cmd)}", flush=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200:
                    self.startup_s = time.monotonic() - t0
                    print(f"{self.name} healthy after {self.startup_s:.1f} s", flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)  # poll interval; the loop is bounded by the deadline above
        raise RuntimeError(
            f"{self.name} not healthy after {timeout:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def sample_rss(self) -> None:
        """Fold the live process tree's VmHWM into the per-pid peaks (a restart starts anew)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for pid in process_tree(self.proc.pid):
            hwm = vm_hwm(pid)
            if hwm is not None:
                self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)

    @property
    def peak_rss(self) -> int:
        return sum(self.hwm.values())

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; idempotent."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {grace:.0f} s; killing it", flush=True)
        # NOTE: the group too: a TP worker must not outlive its parent.
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait(10)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size of `pid` in bytes (VmHWM), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    sys.path.insert(0, str(REPO))
    from scheduler.config import default_model_path

    return default_model_path()


def host_info() -> dict:
    """CPU model and the SIMD flags that pick kernel paths: results only compare on one host."""
    info = {"cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and "cpu" not in info:
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
            info["flags"] = [f for f in wanted if f in flags]
            break
    return info


def make_servers(args: argparse.Namespace, log_dir: Path) -> dict[str, Server]:
    """The command lines, each with a free port (a restarted server reuses its port)."""
    servers = {}
    tm_port = free_port()
    servers["tokenmill"] = Server(
        "tokenmill",
        [args.tokenmill, "serve", args.model, "--host", "127.0.0.1", "--port", str(tm_port)]
        + shlex.split(args.tokenmill_args),
        f"http://127.0.0.1:{tm_port}",
        log_dir / "tokenmill.log",
    )
    if args.peer_binary:
        port = free_port()
        servers["peer"] = Server(
            "llama-server",
            [args.peer_binary, "-m", args.model, "--host", "127.0.0.1", "--port", str(port)]
            + PEER_ARGS
            + shlex.split(args.peer_args),
            f"http://127.0.0.1:{port}",
            log_dir / "llama-server.log",
        )
    return servers


def load_args(args: argparse.Namespace, server: Server) -> argparse.Namespace:
    """serving.py's own flags for one server (same seed, so the same prompts for both)."""
    argv = [
        "--base-url", f"{server.url}/v1",
        "--concurrency", *map(str, args.concurrency),
        "--prompt-tokens", str(args.prompt_tokens),
        "--max-tokens", str(args.max_tokens),
        "--seed", str(args.seed),
        "--request-timeout", str(args.request_timeout),
        "--no-plot",
    ]  # fmt: skip
    if args.num_requests:
        argv += ["--num-requests", str(args.num_requests)]
    if args.duration:
        argv += ["--duration", str(args.duration)]
    return serving.parse_args(argv)


def measure(server: Server, args: argparse.Namespace) -> dict:
    """Start, run every level, read the peak RSS, stop."""
    try:
        server.start(args.startup_timeout)
        report = asyncio.run(serving.bench(load_args(args, server)))
        # NOTE: VmHWM is a high-water mark, so one read after the last level sees every peak.
        server.sample_rss()
        print(f"{server.name} peak RSS {server.peak_rss / 2**30:.2f} GiB", flush=True)
        kernels = kernel_paths(server) if server.name == "tokenmill" else {}
        return {
            **kernels,
            "cmd": server.cmd,
            "model_id": report["model"],
            "prompt_words": report["prompt_words"],
            "startup_s": server.startup_s,
            "peak_rss_bytes": server.peak_rss,
            "levels": report["levels"],
        }
    finally:
        server.stop()


def kernel_paths(server: Server) -> dict:
    """What served tokenmill's run: its start-up line naming the activation path and ISA, and
    tokenmill_model_steps_total by path (fused_int8, torch_float32, ...)."""
    steps: dict[str, float] = {}
    try:
        text = httpx.get(server.url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        text = ""
    for line in text.splitlines():
        m = re.match(r'tokenmill_model_steps_total\{.*path="([^"]+)".*\} (\S+)', line)
        if m:
            steps[m.group(1)] = float(m.group(2))
    try:
        log = server.log_path.read_text(errors="replace")
    except OSError:
        log = ""
    found = re.search(r"holds .* of weights .*?; (\S+ activations.*)", log)
    return {"activations": found.group(1).strip() if found else "?", "steps_by_path": steps}


def span(values: list[float], fmt: str) -> str:
    """One value, or the min-max range over the passes."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def table(passes: list[dict], concurrency: list[int]) -> str:
    """streams | peer tok/s | tokenmill tok/s | ratio | ITL p50 | TTFT p50, ranges over passes."""

    def col(name: str, c: int, key: str) -> list[float]:
        out = []
        for p in passes:
            rows = [r for r in p.get(name, {}).get("levels", []) if r["concurrency"] == c]
            out += [r[key] for r in rows]
        return out

    lines = [
        "| streams | llama-server out tok/s | tokenmill out tok/s | ratio "
        "| ITL p50 llama / tokenmill (ms) | TTFT p50 llama / tokenmill (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrency:
        ratios = []
        for p in passes:
            peer = [r for r in p.get("peer", {}).get("levels", []) if r["concurrency"] == c]
            tm = [r for r in p.get("tokenmill", {}).get("levels", []) if r["concurrency"] == c]
            if peer and tm and peer[0]["output_throughput"]:
                ratios.append(tm[0]["output_throughput"] / peer[0]["output_throughput"])
        lines.append(
            f"| {c} | {span(col('peer', c, 'output_throughput'), '.1f')} "
            f"| {span(col('tokenmill', c, 'output_throughput'), '.1f')} "
            f"| {span(ratios, '.2f')} "
            f"| {span(col('peer', c, 'itl_p50_ms'), '.1f')} / "
            f"{span(col('tokenmill', c, 'itl_p50_ms'), '.1f')} "
            f"| {span(col('peer', c, 'ttft_p50_ms'), '.0f')} / "
            f"{span(col('tokenmill', c, 'ttft_p50_ms'), '.0f')} |"
        )
    rss = {
        name: max((p[name]["peak_rss_bytes"] for p in passes if name in p), default=0)
        for name in ("peer", "tokenmill")
    }
    rss_text = ", ".join(
        f"{NAMES[name]} {value / 2**30:.2f} GiB" for name, value in rss.items() if value
    )
    return "\n".join(lines) + f"\n\nPeak RSS (VmHWM, process tree, max over passes): {rss_text}"


def orders(args: argparse.Namespace, have_peer: bool) -> list[list[str]]:
    """The server order of each pass."""
    if not have_peer:
        return [["tokenmill"]]
    return {
        "peer-first": [["peer", "tokenmill"]],
        "tokenmill-first": [["tokenmill", "peer"]],
        "both": [["peer", "tokenmill"], ["tokenmill", "peer"]],
    }[args.order]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="GGUF file (default: SmolLM2's)")
    ap.add_argument("--peer-binary", default=None, help="llama-server to compare against")
    ap.add_argument("--peer-args", default="", help="extra llama-server flags (one string)")
    ap.add_argument("--tokenmill", default=str(REPO / ".venv" / "bin" / "tokenmill"))
    ap.add_argument("--tokenmill-args", default="", help="extra `tokenmill serve` flags")
    ap.add_argument("--order", choices=("both", "peer-first", "tokenmill-first"), default="both")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=None, help="per level; max(8, 2*C)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to /health")
    ap.add_argument("--output", type=Path, default=None, help="JSON (default under results/)")
    args = ap.parse_args(argv)
    if min(args.concurrency) < 1:
        ap.error(f"--concurrency values must be >= 1, got {args.concurrency}")
    for name in ("prompt_tokens", "max_tokens", "num_requests", "duration", "startup_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    args.model = os.path.abspath(args.model or default_model())
    if not os.path.isfile(args.model):
        ap.error(f"model {args.model} is not a file")
    if args.peer_binary and not os.access(args.peer_binary, os.X_OK):
        ap.error(f"--peer-binary {args.peer_binary} is not an executable file")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the passes, print the table, write the JSON; exit 1 on any failed or short request."""
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.output or REPO / "benchmarks" / "results" / f"compare-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = out.with_suffix("")
    log_dir.mkdir(parents=True, exist_ok=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through `finally`, which stops the servers

    signal.signal(signal.SIGTERM, on_sigterm)
    servers = make_servers(args, log_dir)
    report = {
        "model": args.model,
        "host": host_info(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "passes": [],
        "complete": False,
    }
    try:
        for order in orders(args, "peer" in servers):
            results: dict = {"order": [NAMES[n] for n in order]}
            report["passes"].append(results)
            for name in order:
                results[name] = measure(servers[name], args)
                # NOTE: written after each server, so an interrupted run keeps what it measured.
                out.write_text(json.dumps(report, indent=1))
    finally:
        for server in servers.values():
            server.stop()
    text = table(report["passes"], args.concurrency)
    print()
    print(f"{Path(args.model).name}: ~{args.prompt_tokens} prompt tokens, {args.max_tokens} out")
    host = report["host"]
    print(f"CPU: {host.get('cpu', '?')} x{host.get('cpus')} ({' '.join(host.get('flags', []))})")
    for p in report["passes"]:
        if "tokenmill" in p:
            tm = p["tokenmill"]
            print(f"tokenmill: {tm.get('activations')}; steps by path {tm.get('steps_by_path')}")
    print(text)
    failed = [
        f"{NAMES[n]} C={r['concurrency']}: {r['errors']} failed {r['error_samples']}, "
        f"{r['short_outputs']} with output tokens != --max-tokens {args.max_tokens}"
        for p in report["passes"]
        for n in ("peer", "tokenmill")
        for r in p.get(n, {}).get("levels", [])
        if r["errors"] or r["short_outputs"]
    ]
    for line in failed:
        print(line)
    report |= {"table": text, "complete": True}
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} (server logs in {log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
