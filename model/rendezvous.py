"""Rendezvous of a tensor-parallel group: where its ranks run (ParallelConfig), the head's
TCPStore, the join (fingerprints compared), the process groups, the step broadcast and the
heartbeats. The layers' collectives are model/parallel.py.

Groups are built from a TCPStore, not the global default group: one process can hold several.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from model.parallel import ParallelContext

if TYPE_CHECKING:
    from model.config import ModelConfig

DEFAULT_TIMEOUT_S = 300.0  # a collective waiting this long on a (hung, not dead) peer raises
DEFAULT_JOIN_TIMEOUT_S = 300.0  # every host joins within this (--distributed-timeout)
LOCAL_START_TIMEOUT_S = 300.0  # spawn + import torch, for the head's own ranks (slow CI machines)
STEP_WAIT = timedelta(days=365)  # a rank waits this long for rank 0's next step (idle server)
HEARTBEAT_INTERVAL_S = 1.0  # rank 0 pings every other rank this often
HEARTBEAT_TIMEOUT_S = 30.0  # a rank (or head) silent this long is lost; a dead one at once
MAX_BROADCAST_BYTES = 1 << 30  # a longer payload is refused before its buffer is allocated


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Where the ranks of one tensor-parallel group run: `nnodes` hosts, tp/nnodes ranks each."""

    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port, picked by the head (single node only)
    distributed_timeout: float = DEFAULT_JOIN_TIMEOUT_S  # seconds for every host to join
    # every node proves it on joining (model/join.py); never printed, logged or compared
    cluster_secret: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        tp, n = self.tensor_parallel_size, self.nnodes
        if tp < 1 or n < 1:
            raise ValueError(f"tensor_parallel_size {tp} and nnodes {n} must be >= 1")
        if tp % n:
            raise ValueError(f"tensor_parallel_size {tp} is not divisible by nnodes {n}")
        if not 0 <= self.node_rank < n:
            raise ValueError(f"node_rank {self.node_rank} is not in [0, nnodes {n})")
        if n > 1 and not 0 < self.master_port < 65536:
            raise ValueError(f"nnodes {n} needs --master-port (1-65535), got {self.master_port}")
        if self.distributed_timeout <= 0:
            raise ValueError(f"distributed_timeout must be > 0, got {self.distributed_timeout}")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse sizes that do not shard evenly, naming every offending size."""
        size = self.tensor_parallel_size
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
        for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(cfg, name) % size:
                bad.append(f"{name} {getattr(cfg, name)}")
        if bad:
            raise ValueError(
                f"tensor_parallel_size {size} does not evenly split the model: {'; '.join(bad)}"
            )

    def check_secret(self) -> None:
        """A group spanning hosts needs the secret its nodes prove on joining."""
        if self.nnodes > 1 and not self.cluster_secret:
            raise ValueError(
                f"nnodes {self.nnodes} needs a shared secret that every host proves on joining: "
                "set --cluster-secret or TOKENMILL_CLUSTER_SECRET (the same on every host)"
            )

    def local_ranks(self) -> list[int]:
        """Global ranks on this node; the first one is the node's own process."""
        n = self.ranks_per_node
        return list(range(self.node_rank * n, (self.node_rank + 1) * n))


def connect_store(config: ParallelConfig, is_head: bool, port: int | None = None) -> Any:
    """The head's TCPStore (bound on master_addr) or a client of it; a client retries connecting
    for distributed_timeout seconds, then raises naming the address."""
    import torch.distributed as dist

    port = config.master_port if port is None else port
    addr = config.master_addr
    timeout = timedelta(seconds=config.distributed_timeout)
    try:
        return dist.TCPStore(
            addr, port, config.tensor_parallel_size, is_head, timeout=timeout,
            wait_for_workers=False,
        )  # fmt: skip
    except (RuntimeError, OSError) as e:
        what = "listen on" if is_head else "reach the head at"
        raise ConnectionError(
            f"cannot {what} {addr}:{port} within {config.distributed_timeout:g} s "
            f"(--master-addr/--master-port, --distributed-timeout): {first_line(e)}"
        ) from e


def first_line(e: BaseException) -> str:
    """A c10d/gloo error without its C++ source location and hints."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\] ?", "", text).split(". This is typically")[0]


@dataclass(slots=True)
class RankGroups:
    """One rank's process groups: compute (the layers' collectives), control (steps from rank 0)
    and heartbeat (one 2-rank gloo group per peer of rank 0, for liveness)."""

    ctx: ParallelContext
    control: Any
    heartbeats: dict[int, Any]  # peer rank → its pair group with rank 0 (rank 0 holds them all)


def init_groups(
    store: Any, rank: int, size: int, local_size: int, device: torch.device
) -> RankGroups:
    """Join the groups through `store` (nccl compute group on CUDA, gloo otherwise); waiting
    for the next step is unbounded (STEP_WAIT): the heartbeats catch a silent head."""
    import torch.distributed as dist

    timeout = timedelta(seconds=DEFAULT_TIMEOUT_S)
    tp_store = dist.PrefixStore("tp/", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(tp_store, rank, size, opts)
    else:
        group = dist.ProcessGroupGloo(tp_store, rank, size, timeout)
    control = dist.ProcessGroupGloo(dist.PrefixStore("control/", store), rank, size, timeout)
    beat = timedelta(seconds=HEARTBEAT_TIMEOUT_S)
    peers = range(1, size) if rank == 0 else [rank]
    heartbeats = {
        peer: dist.ProcessGroupGloo(
            dist.PrefixStore(f"heartbeat/{peer}/", store), int(rank != 0), 2, beat
        )
        for peer in peers
    }
    ctx = ParallelContext(rank=rank, size=size, group=group, local_size=local_size)
    return RankGroups(ctx, control, heartbeats)


def broadcast_bytes(payload: bytes | None, group: Any) -> bytes:
    """Rank 0's (non-empty) payload on every rank of `group`: a length, then the bytes."""
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.timeout = STEP_WAIT  # NOTE: the wait for the next step, not a rendezvous
    header = torch.tensor([len(payload or b"")], dtype=torch.long)
    group.broadcast([header], opts).wait()
    size = int(header.item())
    if not 0 < size <= MAX_BROADCAST_BYTES:
        raise ValueError(f"broadcast payload of {size} bytes is not in [1, {MAX_BROADCAST_BYTES}]")
    if payload is None:
        data = torch.empty(size, dtype=torch.uint8)
    else:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    group.broadcast([data], opts).wait()
    return data.numpy().tobytes()


def heartbeat(group: Any, first: bool, stop: threading.Event) -> str | None:
    """Round trips on a pair group (rank 0 is `first` and paces them) until the other side is
    gone (at once) or silent (HEARTBEAT_TIMEOUT_S): its error; None once `stop` is set."""
    beat, peer = torch.zeros(1), int(first)
    while not stop.is_set():
        try:
            for send in (first, not first):
                (group.send if send else group.recv)([beat], peer, 0).wait()
        except RuntimeError as e:
            return None if stop.is_set() else first_line(e)
        if first:
            stop.wait(HEARTBEAT_INTERVAL_S)  # NOTE: pacing, not synchronisation
    return None


def destroy_groups(groups: RankGroups) -> None:
    """Release every group's connections (best effort: a dead peer must not block shutdown)."""
    for group in (groups.ctx.group, groups.control, *groups.heartbeats.values()):
        with contextlib.suppress(RuntimeError, AttributeError):
            group.shutdown()
