"""Executors: the ranks that hold one model and how each step (model/inputs.py) reaches them.

Executor runs the one rank in this process (tp=1); DistributedExecutor is rank 0 of a group whose
other ranks it spawns here or `tokenmill worker` spawns on other hosts (steps: a gloo broadcast).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

import torch

from model.inputs import StepInput, StepOutput, encode_step
from model.join import JoinGuard, join, seal
from model.rendezvous import (
    HEARTBEAT_TIMEOUT_S,
    ParallelConfig,
    RankGroups,
    broadcast_bytes,
    connect_store,
    destroy_groups,
    first_line,
    heartbeat,
    init_groups,
)
from model.runner import ModelRunner, resolve_device
from model.worker import (
    STOP,
    STOP_TIMEOUT_S,
    LocalRanks,
    exit_reason,
    fingerprint,
    read_model_config,
)

if TYPE_CHECKING:
    from model.constraints import ConstraintBatch

logger = logging.getLogger(__name__)


def make_executor(
    model: str, runner_kwargs: dict[str, Any], config: ParallelConfig | None = None
) -> Executor:
    """tp=1 on one host: in-process; anything else: rank 0 of a distributed group."""
    config = config or ParallelConfig()
    if config.node_rank != 0:
        raise ValueError(f"node rank {config.node_rank} runs `tokenmill worker`, not the engine")
    if config.tensor_parallel_size == 1:
        return Executor(ModelRunner(model, **runner_kwargs))
    return DistributedExecutor(model, runner_kwargs, config)


class Executor:
    """What the scheduler needs from the ranks of one model; this base is the one rank, here."""

    dead_reason: str | None = None  # why no step can run any more (a lost rank); None: healthy

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner  # this process's rank (rank 0): tests and diagnostics read it
        self.model_config = runner.model_config
        self.max_model_len = runner.max_model_len
        self.num_kv_blocks = runner.num_kv_blocks  # the same on every rank
        self.block_size = runner.block_size

    @property
    def last_timings(self) -> dict[str, float]:
        return self.runner.last_timings

    @property
    def last_path(self) -> str:
        """What served the last step on rank 0 (ModelRunner.choose_path + activation dtype)."""
        return self.runner.last_path

    def execute(self, step: StepInput, constraints: ConstraintBatch | None = None) -> StepOutput:
        """One step on every rank; rank 0 samples (constraints: its grammar masks, or None)."""
        return self.runner.execute(step, constraints)

    def is_healthy(self) -> bool:
        return self.dead_reason is None

    def on_worker_death(self, fn: Callable[[str], None]) -> None:
        """fn(reason) runs on a monitor thread when a rank is lost: never, with one rank."""

    def shutdown(self) -> None:
        self.runner.shutdown()


class DistributedExecutor(Executor):
    """Rank 0 of a tensor-parallel group: hosts the rendezvous store, spawns this host's other
    ranks, sends each step to all ranks and alone samples. A rank that dies or goes silent
    (HEARTBEAT_TIMEOUT_S) is named by `dead_reason`; `execute` raises from then on."""

    def __init__(self, model: str, runner_kwargs: dict[str, Any], config: ParallelConfig) -> None:
        cfg = read_model_config(model, runner_kwargs)
        config.check_model(cfg)  # NOTE: before anything is spawned or bound
        config.check_secret()
        if not config.cluster_secret:  # one host: only the ranks it spawns learn it
            config = dataclasses.replace(config, cluster_secret=secrets.token_hex(32))
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._dead = threading.Event()
        self._stop = threading.Event()
        self._beats: list[threading.Thread] = []
        self.groups: RankGroups | None = None
        self._guard: JoinGuard | None = None
        self._sent = 0  # control messages sent (each signed with its number)
        self.local: LocalRanks | None = None
        self.store = connect_store(config, is_head=True)
        self.config = config = dataclasses.replace(config, master_port=self.store.port)
        try:
            self.local = LocalRanks(
                model, runner_kwargs, config, self.store.port, config.local_ranks()[1:]
            )
            mine = fingerprint(model, cfg, runner_kwargs, config)
            self._guard = join(self.store, config, 0, mine, self._local_exit)
            device = resolve_device(runner_kwargs.get("device", "auto"), 0)
            size = config.tensor_parallel_size
            self.groups = init_groups(self.store, 0, size, config.ranks_per_node, device)
            self.local.watch(lambda rank, reason: self._mark_dead(self._with_error(rank, reason)))
            for peer in range(1, size):
                beat = threading.Thread(
                    target=self._heartbeat, args=(peer,), name=f"tokenmill-heartbeat-{peer}",
                    daemon=True,
                )  # fmt: skip
                beat.start()
                self._beats.append(beat)
            super().__init__(ModelRunner(model, **runner_kwargs, parallel=self.groups.ctx))
        except BaseException as e:
            reason = self._wait_dead(2.0) if self.groups is not None else self._local_exit()
            self.shutdown()
            if reason is not None and not isinstance(e, (ValueError, TimeoutError)):
                raise RuntimeError(reason) from e
            raise
        logger.info(
            "tensor parallel: %d ranks on %d node(s) (%d per node), local workers %s",
            size, config.nnodes, config.ranks_per_node,
            [p.pid for p in self.local.procs.values()],
        )  # fmt: skip

    def _send(self, step: StepInput | None) -> None:
        """The step to every rank (encoded once, without sampling rows: only rank 0 samples),
        or STOP."""
        payload = STOP
        if step is not None:
            payload = encode_step(dataclasses.replace(step, sampling=[]))
        # NOTE: signed, so a rank reads only what the head sent (model/join.py)
        self._sent += 1
        broadcast_bytes(seal(self.config.cluster_secret, self._sent, payload), self.groups.control)

    def compute_logits(self, step: StepInput) -> torch.Tensor:
        """Send the step to every rank and run rank 0's part: [num_sample_rows, vocab] logits."""
        if self.dead_reason is not None:
            raise RuntimeError(self.dead_reason)
        self.runner.check_step(step)  # NOTE: a step no rank can run is refused before sending
        t0 = time.perf_counter()
        try:
            self._send(step)
            sent = time.perf_counter() - t0
            logits = self.runner.compute_logits(step)
        except Exception as e:  # a rank died or the group broke: no later step can run
            self._mark_dead(f"tensor-parallel step failed: {type(e).__name__}: {first_line(e)}",
                            wait=True)  # fmt: skip
            raise RuntimeError(self.dead_reason) from e
        self.runner.last_timings["prepare"] += sent
        return logits

    def execute(self, step: StepInput, constraints: ConstraintBatch | None = None) -> StepOutput:
        return self.runner.sample(self.compute_logits(step), step, constraints)

    def on_worker_death(self, fn: Callable[[str], None]) -> None:
        """fn(reason) runs on a monitor thread when a rank is lost (at once if one already was)."""
        with self._lock:
            self._callbacks.append(fn)
            reason = self.dead_reason
        if reason is not None:
            fn(reason)

    def _mark_dead(self, reason: str, wait: bool = False) -> None:
        """The first reason wins; `wait`: give the monitors time to name the rank first."""
        if wait and self._wait_dead(HEARTBEAT_TIMEOUT_S + 1.0) is not None:
            return
        with self._lock:
            if self.dead_reason is not None or self._stop.is_set():
                return
            self.dead_reason = reason
            callbacks = list(self._callbacks)
        self._dead.set()
        logger.error("%s", reason)
        for fn in callbacks:
            try:
                fn(reason)
            except Exception:
                logger.exception("worker-death callback %r failed", fn)

    def _wait_dead(self, timeout: float) -> str | None:
        self._dead.wait(timeout)
        return self.dead_reason

    def _heartbeat(self, peer: int) -> None:
        """A peer that is gone or silent: a local rank is named by its exit code, a remote one by
        its node."""
        detail = heartbeat(self.groups.heartbeats[peer], first=True, stop=self._stop)
        if detail is None:
            return
        proc = self.local.procs.get(peer) if self.local is not None else None
        # NOTE: a local rank that exited is the monitor's to name (with its exit code); joining it
        # here too races the monitor's waitpid and can read no exit code at all
        if proc is not None and wait([proc.sentinel], 2.0):
            if self._wait_dead(5.0) is None:
                self._mark_dead(self._with_error(peer, exit_reason(peer, proc)))
            return
        node = self.config.node_of(peer)
        self._mark_dead(self._with_error(peer, f"tensor-parallel rank {peer} on node {node} lost: "
                                               f"{detail}"))  # fmt: skip

    def _with_error(self, rank: int, reason: str) -> str:
        """Append the error a rank posted before exiting, if it did."""
        with contextlib.suppress(RuntimeError):
            if self.store is not None and self.store.check([f"error/{rank}"]):
                return f"{reason}: {self.store.get(f'error/{rank}').decode()}"
        return reason

    def _local_exit(self) -> str | None:
        """The reason of the first local rank that has exited, else None (no waiting)."""
        for rank, proc in (self.local.procs if self.local is not None else {}).items():
            if proc.exitcode is not None:
                return self._with_error(rank, exit_reason(rank, proc))
        return None

    def shutdown(self) -> None:
        """Tell every rank to stop, join this host's ranks and release the groups (idempotent)."""
        if self._stop.is_set():
            return
        healthy = self.dead_reason is None
        self._stop.set()
        if self.groups is not None and healthy:
            try:
                self._send(None)
            except RuntimeError as e:
                logger.warning("could not send stop to every rank: %s", first_line(e))
        if self.local is not None:
            self.local.stop(STOP_TIMEOUT_S if healthy else 0.0)  # NOTE: no stop reached them
        for beat in self._beats:
            beat.join(1.0)
        if self._guard is not None:
            self._guard.stop()
        if self.groups is not None:
            destroy_groups(self.groups)
        self.groups, self.store = None, None
