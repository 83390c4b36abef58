"""Executors: the ranks that hold one model and how each step reaches them.

The scheduler talks to an executor only, through the step contract (model/inputs.py):
`execute(step, constraints=None) -> StepOutput`. UniProcExecutor runs the one rank in this
process (tp=1); DistributedExecutor is rank 0 of a tensor-parallel group whose other ranks are
processes it spawns on this host and, with nnodes > 1, ranks that other hosts' `tokenmill worker`
spawn. Steps reach them by a broadcast on a gloo control group next to the compute group.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from model.config import ModelConfig
from model.inputs import StepInput, StepOutput
from model.parallel import (
    HEARTBEAT_TIMEOUT_S,
    ParallelConfig,
    RankGroups,
    connect_store,
    destroy_groups,
    first_line,
    init_groups,
    join,
)
from model.runner import ModelRunner, resolve_device
from model.worker import (
    STOP_TIMEOUT_S,
    LocalRanks,
    exit_reason,
    fingerprint,
    heartbeat_loop,
    read_model_config,
    send_step,
)

if TYPE_CHECKING:
    from model.constraints import ConstraintBatch

logger = logging.getLogger(__name__)


class Executor(Protocol):
    """What the scheduler needs from the ranks of one model."""

    runner: ModelRunner  # this process's rank (rank 0): tests and diagnostics read it
    model_config: ModelConfig
    max_model_len: int
    num_kv_blocks: int  # the same on every rank
    block_size: int

    @property
    def last_timings(self) -> dict[str, float]: ...

    @property
    def dead_reason(self) -> str | None: ...

    def execute(
        self, step: StepInput, constraints: ConstraintBatch | None = None
    ) -> StepOutput: ...

    def is_healthy(self) -> bool: ...

    def on_worker_death(self, fn: Callable[[str], None]) -> None: ...

    def shutdown(self) -> None: ...


def make_executor(
    model: str, runner_kwargs: dict[str, Any], config: ParallelConfig | None = None
) -> Executor:
    """tp=1 on one host: in-process; anything else: rank 0 of a distributed group."""
    config = config or ParallelConfig()
    if config.node_rank != 0:
        raise ValueError(f"node rank {config.node_rank} runs `tokenmill worker`, not the engine")
    if config.tensor_parallel_size == 1:
        return UniProcExecutor(model, runner_kwargs)
    return DistributedExecutor(model, runner_kwargs, config)


class UniProcExecutor:
    """The one rank, in this process: execute is the runner's."""

    def __init__(self, model: str, runner_kwargs: dict[str, Any]) -> None:
        self.runner = ModelRunner(model, **runner_kwargs)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.block_size = self.runner.block_size

    @property
    def last_timings(self) -> dict[str, float]:
        return self.runner.last_timings

    @property
    def dead_reason(self) -> str | None:
        return None

    def execute(self, step: StepInput, constraints: ConstraintBatch | None = None) -> StepOutput:
        return self.runner.execute(step, constraints)

    def is_healthy(self) -> bool:
        return True

    def on_worker_death(self, fn: Callable[[str], None]) -> None:
        """Never called: there is no other rank to lose."""

    def shutdown(self) -> None:
        self.runner.shutdown()


class DistributedExecutor:
    """Rank 0 of a tensor-parallel group: hosts the rendezvous store, spawns this host's other
    ranks, checks every host's fingerprint, sends each step to all ranks and alone samples.

    A rank that dies, or goes silent for HEARTBEAT_TIMEOUT_S, marks the group dead: `dead_reason`
    names it, the `on_worker_death` callbacks run, and `execute` raises from then on.
    """

    def __init__(self, model: str, runner_kwargs: dict[str, Any], config: ParallelConfig) -> None:
        cfg = read_model_config(model, runner_kwargs)
        config.check_model(cfg)  # NOTE: before anything is spawned or bound
        self.config = config
        self._dead_reason: str | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._dead = threading.Event()
        self._stop = threading.Event()
        self._beats: list[threading.Thread] = []
        self.groups: RankGroups | None = None
        self.local: LocalRanks | None = None
        self.store = connect_store(config, is_head=True)
        self.config = config = dataclasses.replace(config, master_port=self.store.port)
        try:
            self.local = LocalRanks(
                model, runner_kwargs, config, self.store.port, config.local_ranks()[1:]
            )
            join(self.store, config, 0, fingerprint(model, cfg, runner_kwargs, config), self._check)
            device = resolve_device(runner_kwargs.get("device", "auto"), 0)
            size = config.tensor_parallel_size
            self.groups = init_groups(self.store, 0, size, config.ranks_per_node, device)
            self.local.watch(lambda rank, reason: self._mark_dead(self._with_error(rank, reason)))
            for peer in range(1, size):
                beat = threading.Thread(
                    target=heartbeat_loop,
                    args=(self.groups, peer, self._stop, self._lost),
                    name=f"tokenmill-heartbeat-{peer}",
                    daemon=True,
                )
                beat.start()
                self._beats.append(beat)
            self.runner = ModelRunner(model, **runner_kwargs, parallel=self.groups.ctx)
        except BaseException as e:
            reason = self._wait_dead(2.0) if self.groups is not None else self._local_exit()
            self.shutdown()
            if reason is not None and not isinstance(e, (ValueError, TimeoutError)):
                raise RuntimeError(reason) from e
            raise
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.block_size = self.runner.block_size
        logger.info(
            "tensor parallel: %d ranks on %d node(s) (%d per node), local workers %s",
            size, config.nnodes, config.ranks_per_node,
            [p.pid for p in self.local.procs.values()],
        )  # fmt: skip

    # -- steps ------------------------------------------------------------------------------------

    @property
    def last_timings(self) -> dict[str, float]:
        return self.runner.last_timings

    def compute_logits(self, step: StepInput) -> torch.Tensor:
        """Send the step to every rank and run rank 0's part: [num_sample_rows, vocab] logits."""
        if self._dead_reason is not None:
            raise RuntimeError(self._dead_reason)
        self.runner.check_step(step)  # NOTE: a step no rank can run is refused before sending
        t0 = time.perf_counter()
        try:
            send_step(self.groups, step)
            sent = time.perf_counter() - t0
            logits = self.runner.compute_logits(step)
        except Exception as e:  # a rank died or the group broke: no later step can run
            self._mark_dead(f"tensor-parallel step failed: {type(e).__name__}: {first_line(e)}",
                            wait=True)  # fmt: skip
            raise RuntimeError(self._dead_reason) from e
        self.runner.last_timings["prepare"] += sent
        return logits

    def execute(self, step: StepInput, constraints: ConstraintBatch | None = None) -> StepOutput:
        """One step on every rank; rank 0 samples.

        Args:
            step: as ModelRunner.execute (sent without its sampling rows).
            constraints: grammar masks for the sampling rows (rank 0 only), or None.
        Raises:
            RuntimeError naming the lost rank once one died or went silent (and for every
            later step).
        """
        return self.runner.sample(self.compute_logits(step), step, constraints)

    # -- health ---------------------------------------------------------------------------------

    @property
    def dead_reason(self) -> str | None:
        """Why the group cannot run steps ("... rank R (pid P) died: exit code X"), else None."""
        return self._dead_reason

    def is_healthy(self) -> bool:
        return self._dead_reason is None

    def on_worker_death(self, fn: Callable[[str], None]) -> None:
        """fn(reason) runs on a monitor thread when a rank is lost (at once if one already was)."""
        with self._lock:
            self._callbacks.append(fn)
            reason = self._dead_reason
        if reason is not None:
            fn(reason)

    def _mark_dead(self, reason: str, wait: bool = False) -> None:
        """The first reason wins; `wait`: give the monitors time to name the rank first."""
        if wait and self._wait_dead(HEARTBEAT_TIMEOUT_S + 1.0) is not None:
            return
        with self._lock:
            if self._dead_reason is not None or self._stop.is_set():
                return
            self._dead_reason = reason
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
        return self._dead_reason

    def _lost(self, peer: int, detail: str) -> None:
        """A heartbeat failed: a local rank is named by its exit code, a remote one by its node."""
        proc = self.local.procs.get(peer) if self.local is not None else None
        if proc is not None:
            proc.join(2.0)
            if proc.exitcode is not None:
                self._mark_dead(self._with_error(peer, exit_reason(peer, proc)))
                return
        node = self.config.node_of(peer)
        self._mark_dead(self._with_error(peer, f"tensor-parallel rank {peer} on node {node} lost: "
                                               f"{detail}"))  # fmt: skip

    def _with_error(self, rank: int, reason: str) -> str:
        """Append the error a rank posted before exiting, if it did."""
        try:
            if self.store is not None and self.store.check([f"error/{rank}"]):
                return f"{reason}: {self.store.get(f'error/{rank}').decode()}"
        except RuntimeError:
            pass
        return reason

    def _local_exit(self) -> str | None:
        if self.local is None:
            return None
        for rank, proc in self.local.procs.items():
            if proc.exitcode is not None:
                return self._with_error(rank, exit_reason(rank, proc))
        return None

    def _check(self) -> None:
        """While waiting for the hosts to join: a local rank that exited ends the wait."""
        reason = self._local_exit()
        if reason is not None:
            raise RuntimeError(reason)

    def shutdown(self) -> None:
        """Tell every rank to stop, join this host's ranks and release the groups (idempotent)."""
        if self._stop.is_set():
            return
        healthy = self._dead_reason is None
        self._stop.set()
        if self.groups is not None and healthy:
            try:
                send_step(self.groups, None)
            except RuntimeError as e:
                logger.warning("could not send stop to every rank: %s", first_line(e))
        if self.local is not None:
            self.local.stop(STOP_TIMEOUT_S if healthy else 0.0)  # NOTE: no stop reached them
        for beat in self._beats:
            beat.join(1.0)
        if self.groups is not None:
            destroy_groups(self.groups)
        self.groups, self.store = None, None
