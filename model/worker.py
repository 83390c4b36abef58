"""Tensor-parallel workers: rank 0's WorkerGroup (spawn, per-step send, death monitor, stop) and
the worker process (ranks 1..N-1) that builds its shard and replays every step rank 0 sends.

Each step's StepInput is pickled once on rank 0 (sampling rows stripped) and written to one pipe
per worker; the pipe also carries start-up errors back and gives workers EOF when rank 0 is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from model.config import ModelConfig
from model.inputs import StepInput
from model.parallel import ParallelContext, create_store, destroy_parallel, init_parallel

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # spawn + import torch + join the group, per worker (slow CI machines)
STOP_TIMEOUT_S = 5.0  # a worker that ignores the stop message is terminated, then killed
PR_SET_PDEATHSIG = 1


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """Refuse sizes that do not shard evenly, naming every offending size."""
    if size == 1:
        return
    bad = []
    if cfg.num_attention_heads % size:
        bad.append(f"num_attention_heads {cfg.num_attention_heads}")
    kv = cfg.num_key_value_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        bad.append(f"num_key_value_heads {kv} (needs a multiple of {size}, or to divide it)")
    if cfg.intermediate_size % size:
        bad.append(f"intermediate_size {cfg.intermediate_size}")
    if bad:
        raise ValueError(
            f"tensor_parallel_size {size} does not evenly split the model: {'; '.join(bad)}"
        )


def worker_device(device: str, rank: int) -> torch.device:
    """auto/cuda → this rank's own GPU (cuda:rank); cpu stays cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return torch.device("cuda", rank) if dev.type == "cuda" else dev


def _exit_reason(rank: int, proc: multiprocessing.process.BaseProcess, message: str) -> str:
    code = proc.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        how += f" ({signal.Signals(-code).name})"
    return f"tensor-parallel worker rank {rank} (pid {proc.pid}) died: {how}" + (
        f": {message}" if message else ""
    )


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What a worker needs to rebuild its shard of the runner rank 0 built."""

    model: str
    runner_kwargs: dict[str, Any]
    size: int
    port: int
    parent_pid: int
    pdeathsig: bool  # only valid when the creating thread lives as long as the process
    num_threads: int
    log_level: int


class WorkerGroup:
    """Rank 0's handle on ranks 1..N-1: started with the runner, stopped by runner.shutdown()."""

    def __init__(self, model: str, runner_kwargs: dict[str, Any], size: int) -> None:
        self.size = size
        self.dead_reason: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._stopping = False
        self._store = create_store(size)
        args = WorkerArgs(
            model,
            runner_kwargs,
            size,
            self._store.port,
            os.getpid(),
            threading.current_thread() is threading.main_thread(),
            torch.get_num_threads(),
            logging.getLogger().getEffectiveLevel(),
        )
        mp = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self._stop_r, self._stop_w = os.pipe()
        self._monitor: threading.Thread | None = None
        try:
            for rank in range(1, size):
                parent_end, child_end = mp.Pipe()
                proc = mp.Process(
                    target=worker_main,
                    args=(rank, args, child_end),
                    name=f"tokenmill-tp{rank}",
                    daemon=True,  # NOTE: also terminated by multiprocessing's atexit hook
                )
                with _without_main_module():
                    proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
            self._wait_hello()
            device = worker_device(runner_kwargs.get("device", "auto"), 0)
            self.parallel: ParallelContext = init_parallel(
                0, size, device, self._store.port, store=self._store
            )
        except BaseException:
            self.stop()
            raise
        self._monitor = threading.Thread(
            target=self._watch, name="tokenmill-tp-monitor", daemon=True
        )
        self._monitor.start()
        logger.info("tensor parallel: %d ranks, workers %s", size, [p.pid for p in self.procs])

    def _wait_hello(self) -> None:
        """Every worker says hello before joining the group, so a crash at import is reported."""
        pending = dict(enumerate(self.conns, start=1))
        deadline = time.monotonic() + START_TIMEOUT_S
        while pending:
            sentinels = {self.procs[r - 1].sentinel: r for r in pending}
            ready = wait(list(pending.values()) + list(sentinels), deadline - time.monotonic())
            if not ready:
                raise RuntimeError(
                    f"tensor-parallel workers {sorted(pending)} not started in {START_TIMEOUT_S} s"
                )
            for rank, conn in list(pending.items()):
                if conn in ready:
                    kind, detail = self._recv(conn)
                    if kind != "hello":
                        self.procs[rank - 1].join(STOP_TIMEOUT_S)
                        raise RuntimeError(_exit_reason(rank, self.procs[rank - 1], detail))
                    del pending[rank]
            for sentinel, rank in sentinels.items():
                if sentinel in ready and rank in pending:
                    raise RuntimeError(_exit_reason(rank, self.procs[rank - 1], ""))

    @staticmethod
    def _recv(conn: Connection) -> tuple[str, str]:
        try:
            return conn.recv()
        except (EOFError, OSError):
            return "eof", ""

    def _watch(self) -> None:
        """Monitor thread: the first worker to exit (outside stop()) marks the group dead."""
        sentinels = {p.sentinel: r for r, p in enumerate(self.procs, start=1)}
        ready = wait([*sentinels, self._stop_r])
        if self._stop_r in ready or self._stopping:
            return
        rank = min(sentinels[s] for s in ready if s in sentinels)
        proc, conn = self.procs[rank - 1], self.conns[rank - 1]
        proc.join(1.0)
        message = ""
        if conn.poll(0):
            kind, detail = self._recv(conn)
            message = detail if kind == "error" else ""
        if self._stopping:
            return
        self.dead_reason = _exit_reason(rank, proc, message)
        logger.error("%s", self.dead_reason)
        for fn in list(self._callbacks):
            try:
                fn(self.dead_reason)
            except Exception:
                logger.exception("worker-death callback %r failed", fn)

    def on_death(self, fn: Callable[[str], None]) -> None:
        """Call fn(reason) on the monitor thread when a worker dies (at once if one already did)."""
        self._callbacks.append(fn)
        if self.dead_reason is not None:
            fn(self.dead_reason)

    def wait_for_death(self, timeout: float) -> str | None:
        """After a failed collective: give the monitor `timeout` s to name the dead rank."""
        if self._monitor is not None:
            self._monitor.join(timeout)
        return self.dead_reason

    def send(self, step: StepInput) -> None:
        """Pickle the step once (without sampling rows: only rank 0 samples), write it to all."""
        if self.dead_reason is not None:
            raise RuntimeError(self.dead_reason)
        payload = pickle.dumps(dataclasses.replace(step, sampling=[]), pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(payload)
            except OSError as e:
                raise RuntimeError(
                    self.wait_for_death(2.0) or f"tensor-parallel worker rank {rank} is gone: {e}"
                ) from e

    def stop(self) -> None:
        """Ask every worker to exit, then terminate/kill stragglers and join all (idempotent)."""
        self._stopping = True
        for conn in self.conns:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                logger.warning("tensor-parallel worker pid %d did not stop: terminating", proc.pid)
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(2.0)
        for conn in self.conns:
            conn.close()
        if hasattr(self, "parallel"):
            destroy_parallel(self.parallel)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.conns, self._stop_r, self._stop_w = [], -1, -1


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Spawn without re-importing the parent's __main__: workers need nothing from it, scripts
    without an `if __name__ == "__main__"` guard keep working, and workers skip server imports."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """A worker never outlives rank 0: PR_SET_PDEATHSIG where safe, plus a ppid watchdog."""
    if pdeathsig and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watchdog, name="tokenmill-tp-watchdog", daemon=True).start()


def worker_main(rank: int, args: WorkerArgs, conn: Connection) -> None:
    """Process entry of ranks 1..N-1: join the group, build the shard, replay steps until stop."""
    _die_with_parent(args.parent_pid, args.pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 stops us
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s",
    )
    torch.set_num_threads(args.num_threads)
    ctx = None
    try:
        conn.send(("hello", str(os.getpid())))
        from model.runner import ModelRunner

        device = worker_device(args.runner_kwargs.get("device", "auto"), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        ctx = init_parallel(rank, args.size, device, args.port)
        runner = ModelRunner(args.model, **args.runner_kwargs, parallel=ctx)
        while True:
            payload = conn.recv_bytes()
            if not payload:
                break
            runner.forward_step(pickle.loads(payload))
    except EOFError:
        logger.warning("rank 0 is gone: exiting")
        os._exit(1)
    except BaseException as e:
        logger.exception("tensor-parallel worker rank %d failed", rank)
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        os._exit(1)
    if ctx is not None:
        destroy_parallel(ctx)
    os._exit(0)
