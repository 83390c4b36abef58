"""Joining a group through the head's store (threads here; tests/e2e/test_multihost.py has real
hosts): a node proves the secret before the head reads it, the head proves it back, a node with
the wrong secret is refused while the head waits on, and later attempts are refused too."""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta

import pytest

from model.join import PROOF_LEN, JoinGuard, join, mac, seal, unseal
from model.rendezvous import ParallelConfig, connect_store

pytestmark = pytest.mark.timeout(60)

SECRET = "the-shared-secret"
FP = {"model": "tiny", "block_size": "16"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configs(port: int, secret: str | None = SECRET, node_rank: int = 1) -> ParallelConfig:
    return ParallelConfig(
        tensor_parallel_size=2, nnodes=2, node_rank=node_rank, master_port=port,
        distributed_timeout=20.0, cluster_secret=secret,
    )  # fmt: skip


class Head(threading.Thread):
    """Rank 0's join on a thread; `result` is its JoinGuard or the exception it raised."""

    def __init__(self, port: int, fingerprint: dict[str, str] = FP) -> None:
        super().__init__(daemon=True)
        self.config = configs(port, node_rank=0)
        self.store = connect_store(self.config, is_head=True)
        self.fingerprint = fingerprint
        self.result: JoinGuard | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = join(self.store, self.config, 0, self.fingerprint)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            self.result = e


def node(port: int, secret: str | None = SECRET, fingerprint: dict[str, str] = FP) -> None:
    config = configs(port, secret)
    join(connect_store(config, is_head=False), config, 1, fingerprint)


def test_wrong_secret_is_refused_and_the_head_waits_for_the_right_one(caplog) -> None:
    port = free_port()
    head = Head(port)
    head.start()
    with caplog.at_level(logging.WARNING, logger="model.join"):
        for wrong in ("not-it", None):
            with pytest.raises(PermissionError) as e:
                node(port, wrong)
            assert str(e.value) == (
                f"the head at 127.0.0.1:{port} refused this node: wrong or missing cluster "
                "secret (--cluster-secret / TOKENMILL_CLUSTER_SECRET)"
            )
        assert head.is_alive() and head.result is None  # still waiting for rank 1
        node(port)  # the right secret: joins
        head.join(10)
        guard = head.result
        assert isinstance(guard, JoinGuard)
        with pytest.raises(PermissionError, match="refused this node: rank 1 already joined"):
            node(port)  # the group formed: the guard refuses
        guard.stop()
    refusals = [r.getMessage().split(": ", 1)[0] for r in caplog.records]
    prefix = f"refused a node joining 127.0.0.1:{port} (attempt "
    # the two wrong secrets, then the late join (which may retry once the guard closes on it)
    assert refusals[:3] == [f"{prefix}{n})" for n in (1, 2, 4)]
    assert all(m.startswith(prefix) for m in refusals[3:]) and len(refusals) <= 4
    assert not any(SECRET in m or "not-it" in m for m in refusals)


def test_a_head_without_the_secret_is_not_believed() -> None:
    """A process posing as the head (it answers "ok" without the secret) is found out."""
    port = free_port()
    config = configs(port, node_rank=0)
    fake = connect_store(config, is_head=True)
    fake.set("auth/challenge", "00" * 32)

    def answer() -> None:
        fake.wait(["join/1"], timedelta(seconds=20))
        fake.set("verdict/1", b"0" * PROOF_LEN + b"ok")

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(PermissionError, match="did not prove the cluster secret"):
        node(port)
    record = fake.get("join/1")
    assert record[:PROOF_LEN] == mac(SECRET, b"join", b"00" * 32, record[PROOF_LEN:])


def test_mismatched_fingerprints_fail_both_sides_with_the_fields() -> None:
    port = free_port()
    head = Head(port)
    head.start()
    want = ("hosts disagree on the model or flags (theirs vs the head's): rank 1 (node 1): "
            "block_size '32' vs '16'")  # fmt: skip
    with pytest.raises(ValueError) as e:
        node(port, fingerprint={**FP, "block_size": "32"})
    head.join(10)
    assert str(e.value) == want and str(head.result) == want


def test_nnodes_above_one_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="nnodes 2 needs a shared secret that every host proves"):
        configs(1234, secret=None).check_secret()
    configs(1234).check_secret()
    ParallelConfig(tensor_parallel_size=2).check_secret()  # one host: the head makes one up
    assert SECRET not in repr(configs(1234))


def test_control_messages_are_signed_for_their_place() -> None:
    sealed = seal(SECRET, 7, b"step bytes")
    assert sealed[PROOF_LEN:] == b"step bytes" and unseal(SECRET, 7, sealed) == b"step bytes"
    for secret, counter, data, why in (
        ("other", 7, sealed, "another secret"),
        (SECRET, 8, sealed, "replayed as the next message"),
        (SECRET, 7, sealed[:-1] + b"X", "tampered"),
        (SECRET, 7, b"short", "no MAC at all"),
    ):
        with pytest.raises(PermissionError, match=f"control message {counter} is not signed"):
            unseal(secret, counter, data)
            pytest.fail(why)
