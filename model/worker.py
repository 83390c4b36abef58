"""The ranks that do not schedule: rank processes spawned on a host (LocalRanks), the loop each of
them runs (serve_rank) and `tokenmill worker` (run_node), a host other than the head."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, NoReturn

import torch

from model.config import ModelConfig
from model.inputs import decode_step
from model.join import join, unseal
from model.pooler import as_base_model_config
from model.rendezvous import (
    ParallelConfig,
    broadcast_bytes,
    connect_store,
    destroy_groups,
    first_line,
    heartbeat,
    init_groups,
)
from model.runner import ModelRunner, open_checkpoint, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

STOP = b"\x00"  # the control message that ends every rank's loop (never an encoded step)
STOP_TIMEOUT_S = 5.0  # a rank that ignores the stop message is terminated, then killed
PR_SET_PDEATHSIG = 1


def fingerprint(
    model: str, cfg: ModelConfig, runner_kwargs: dict[str, Any], config: ParallelConfig
) -> dict[str, str]:
    """What every host must agree on before joining: model, its config and the shaping flags."""
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    device = resolve_device(runner_kwargs.get("device", "auto"))
    dtype = resolve_dtype(runner_kwargs.get("dtype", "auto"), device)  # "auto" = its resolution
    keys = ("quantization", "kv_cache_dtype", "block_size", "max_model_len")
    return {
        "model": os.path.basename(os.path.normpath(model)),
        "model_config": digest,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        **{k: str(runner_kwargs.get(k)) for k in (*keys, "max_num_batched_tokens")},
        "tensor_parallel_size": str(config.tensor_parallel_size),
        "nnodes": str(config.nnodes),
    }


def read_model_config(model: str, runner_kwargs: dict[str, Any]) -> ModelConfig:
    """The model's config alone (no weights read): enough to check the split and fingerprint."""
    config, _, _ = open_checkpoint(model, runner_kwargs.get("quantization"))
    if runner_kwargs.get("runner") == "pooling":
        config = as_base_model_config(config)  # a sentence-transformers folder's base model
    return ModelConfig.from_hf_dict(config)


def exit_reason(rank: int, proc: multiprocessing.process.BaseProcess) -> str:
    code = proc.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        how += f" ({signal.Signals(-code).name})"
    return f"tensor-parallel worker rank {rank} (pid {proc.pid}) died: {how}"


@dataclass(frozen=True, slots=True)
class RankArgs:
    """What a spawned rank needs to join the group and rebuild its shard."""

    model: str
    runner_kwargs: dict[str, Any]
    config: ParallelConfig
    rank: int
    port: int  # the head's store port (master_port, or the one it picked)
    parent_pid: int
    pdeathsig: bool  # only valid when the creating thread lives as long as the process
    num_threads: int
    log_level: int


class LocalRanks:
    """Rank processes spawned on this host; a monitor thread reports the first to exit."""

    def __init__(
        self, model: str, runner_kwargs: dict[str, Any], config: ParallelConfig, port: int,
        ranks: list[int],
    ) -> None:  # fmt: skip
        self._stopping = False
        mp = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._monitor: threading.Thread | None = None
        pdeathsig = threading.current_thread() is threading.main_thread()
        level = logging.getLogger().getEffectiveLevel()
        try:
            for rank in ranks:
                args = RankArgs(
                    model, runner_kwargs, config, rank, port, os.getpid(), pdeathsig,
                    torch.get_num_threads(), level,
                )  # fmt: skip
                # NOTE: daemon: also terminated by multiprocessing's atexit hook
                proc = mp.Process(target=rank_main, args=(args,), name=f"tokenmill-tp{rank}",
                                  daemon=True)  # fmt: skip
                with _without_main_module():
                    proc.start()
                self.procs[rank] = proc
        except BaseException:
            self.stop()
            raise

    def watch(self, on_exit: Callable[[int, str], None]) -> None:
        """Call on_exit(rank, reason) on a monitor thread when a rank exits outside stop()."""

        def run() -> None:
            sentinels = {p.sentinel: r for r, p in self.procs.items()}
            ready = wait(list(sentinels))  # NOTE: stop() ends every rank, so this returns
            if self._stopping:
                return
            rank = min(sentinels[s] for s in ready)
            self.procs[rank].join(1.0)
            # NOTE: a rank exits 0 only after the stop message (a clean shutdown)
            if self.procs[rank].exitcode != 0 and not self._stopping:
                on_exit(rank, exit_reason(rank, self.procs[rank]))

        if self.procs:
            self._monitor = threading.Thread(target=run, name="tokenmill-tp-monitor", daemon=True)
            self._monitor.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Join every rank (they got the stop message), terminating then killing stragglers."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.is_alive():
                logger.warning("tensor-parallel rank pid %d did not stop: terminating", proc.pid)
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(2.0)


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Spawn without re-importing the parent's __main__: ranks need nothing from it, scripts
    without an `if __name__ == "__main__"` guard keep working, and ranks skip server imports."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """A spawned rank never outlives its host's process: PR_SET_PDEATHSIG where safe, plus a
    ppid watchdog."""
    if pdeathsig and sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watchdog, name="tokenmill-tp-watchdog", daemon=True).start()


def rank_main(args: RankArgs) -> None:
    """Process entry of a spawned rank: serve it, then exit (non-zero on any failure)."""
    _die_with_parent(args.parent_pid, args.pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: rank 0 stops us
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s %(levelname)s [tp rank {args.rank}] %(name)s: %(message)s",
    )
    torch.set_num_threads(args.num_threads)
    try:
        serve_rank(args.model, args.runner_kwargs, args.config, args.rank, args.port)
    except BaseException:
        logger.exception("tensor-parallel rank %d failed", args.rank)
        os._exit(1)
    os._exit(0)


def serve_rank(
    model: str, runner_kwargs: dict[str, Any], config: ParallelConfig, rank: int, port: int
) -> None:
    """Rank r > 0: join, build the shard, then run every step rank 0 broadcasts until it says
    stop; raises when the head is lost (its connection breaks, or heartbeats stop)."""
    cfg = read_model_config(model, runner_kwargs)
    config.check_model(cfg)
    local_rank = rank - config.node_rank * config.ranks_per_node
    device = resolve_device(runner_kwargs.get("device", "auto"), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = connect_store(config, is_head=False, port=port)
    join(store, config, rank, fingerprint(model, cfg, runner_kwargs, config))
    groups = init_groups(store, rank, config.tensor_parallel_size, config.ranks_per_node, device)
    head = f"{config.master_addr}:{port}"

    def answer_heartbeats() -> None:
        """A head that is gone or silent ends this process."""
        (group,) = groups.heartbeats.values()
        detail = heartbeat(group, first=False, stop=threading.Event())
        logger.error("the head at %s is lost (%s): exiting", head, detail)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=answer_heartbeats, name="tokenmill-heartbeat", daemon=True).start()
    try:
        runner = ModelRunner(model, **runner_kwargs, parallel=groups.ctx, local_rank=local_rank)
        for received in itertools.count(1):
            try:
                sealed = broadcast_bytes(None, groups.control)
            except RuntimeError as e:
                raise ConnectionError(f"the head at {head} is lost: {first_line(e)}") from e
            payload = unseal(config.cluster_secret or "", received, sealed)
            if payload == STOP:
                break
            runner.execute(decode_step(payload))
    except BaseException as e:
        with contextlib.suppress(Exception):  # the head names this rank's error when it is lost
            store.set(f"error/{rank}", f"{type(e).__name__}: {e}")
        raise
    finally:
        destroy_groups(groups)


def run_node(model: str, runner_kwargs: dict[str, Any], config: ParallelConfig) -> NoReturn:
    """`tokenmill worker`: this host's ranks; exits 0 when the head stopped them, 1 when it (or a
    rank here) was lost or start-up failed.

    NOTE: ends with os._exit, as spawned ranks do: the heartbeat thread may still be inside a
    gloo receive, and interpreter teardown under it aborts the process (SIGABRT).
    """
    if config.node_rank == 0:
        raise ValueError("node rank 0 is the head: run `tokenmill serve` there")
    config.check_secret()
    first, *others = config.local_ranks()
    local = LocalRanks(model, runner_kwargs, config, config.master_port, others)

    def leave(code: int) -> NoReturn:
        logging.shutdown()
        os._exit(code)

    def died(rank: int, reason: str) -> None:
        logger.error("%s: exiting", reason)
        leave(1)

    try:
        local.watch(died)
        logger.info("node %d: ranks %s, joining %s:%d", config.node_rank,
                    config.local_ranks(), config.master_addr, config.master_port)  # fmt: skip
        serve_rank(model, runner_kwargs, config, first, config.master_port)
    except Exception as e:
        logger.error("node %d: %s: %s", config.node_rank, type(e).__name__, e)
        local.stop(0.0)
        leave(1)
    local.stop()
    logger.info("node %d: stopped by the head", config.node_rank)
    leave(0)
