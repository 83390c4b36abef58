"""Joining a tensor-parallel group through the head's store: every node proves the cluster secret
(HMAC over the head's challenge) before the head reads what it sent, the head proves it back
(HMAC over the node's nonce), then the head compares fingerprints and posts each node's verdict.

A join attempt n is `join/n` (n from the store's counter), answered by `verdict/n`. A node with a
wrong or missing secret is refused ("refused: ..."), and the head goes on waiting (or, once the
group formed, serving): a thread refuses every later attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from model.rendezvous import LOCAL_START_TIMEOUT_S, ParallelConfig, connect_store, first_line

logger = logging.getLogger(__name__)

PROOF_LEN = 64  # hex characters of an HMAC-SHA256
MAX_RECORD_BYTES = 64 * 1024  # a join record is a few hundred bytes; larger ones are refused
REFUSED = "refused: "
WRONG_SECRET = "wrong or missing cluster secret (--cluster-secret / TOKENMILL_CLUSTER_SECRET)"
GUARD_WAIT = timedelta(days=365)  # the guard waits this long for the next attempt (until stop)


def mac(secret: str, *parts: bytes) -> bytes:
    """HMAC-SHA256 (hex) of the parts, tagged with the protocol, under the cluster secret."""
    msg = b"\x1f".join((b"tokenmill-join-v1", *parts))
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest().encode()


def seal(secret: str, counter: int, payload: bytes) -> bytes:
    """A control message signed for its place in the sequence: the MAC of (counter, payload),
    then the payload (a replayed or reordered message fails its counter)."""
    return mac(secret, b"step", str(counter).encode(), payload) + payload


def unseal(secret: str, counter: int, sealed: bytes) -> bytes:
    """The payload of a sealed message, after its MAC is checked (PermissionError if not)."""
    proof, payload = sealed[:PROOF_LEN], sealed[PROOF_LEN:]
    if not hmac.compare_digest(proof, mac(secret, b"step", str(counter).encode(), payload)):
        raise PermissionError(f"control message {counter} is not signed with the cluster secret")
    return payload


class Refused(Exception):
    """A join attempt the head does not accept; the message is what the node hears."""


def join(
    store: Any,
    config: ParallelConfig,
    rank: int,
    fingerprint: dict[str, str],
    dead: Callable[[], str | None] = lambda: None,
) -> JoinGuard | None:
    """Rendezvous before anything is loaded: every rank proves the secret and posts its
    fingerprint, rank 0 checks them (while `dead()` names no local rank that exited:
    RuntimeError) and answers each with its verdict.

    Raises TimeoutError naming the ranks and nodes that never joined, ValueError naming the
    fields that differ, PermissionError when the head refused this node or did not prove the
    secret itself. Rank 0 gets the JoinGuard that refuses later attempts (stop it on shutdown).
    """
    secret = config.cluster_secret or ""
    if rank != 0:
        _join_as_node(store, config, rank, fingerprint, secret)
        return None
    challenge = secrets.token_hex(32).encode()
    store.set("auth/challenge", challenge)
    head = _Head(store, config, secret, challenge)
    try:
        head.gather(fingerprint, dead)
    except BaseException as e:
        head.answer_all(str(e) or type(e).__name__)
        raise
    head.answer_all("ok")
    return JoinGuard(head)


def _join_as_node(
    store: Any, config: ParallelConfig, rank: int, fingerprint: dict[str, str], secret: str
) -> None:
    timeout = config.distributed_timeout
    where = f"{config.master_addr}:{config.master_port}"

    def wait(key: str) -> bytes:
        try:
            store.wait([key], timedelta(seconds=timeout))
        except RuntimeError as e:
            raise TimeoutError(
                f"the head at {where} did not start the group within {timeout:g} s "
                f"(--distributed-timeout): {first_line(e)}"
            ) from e
        return store.get(key)

    challenge = wait("auth/challenge")
    nonce = secrets.token_hex(16)
    body = json.dumps({"rank": rank, "nonce": nonce, "fingerprint": fingerprint}).encode()
    attempt = store.add("join/attempts", 1)
    store.set(f"join/{attempt}", mac(secret, b"join", challenge, body) + body)
    answer = wait(f"verdict/{attempt}")
    text = answer[PROOF_LEN:]
    if answer.startswith(REFUSED.encode()):
        reason = answer[len(REFUSED) : len(REFUSED) + 300].decode(errors="replace")  # unproven
        raise PermissionError(f"the head at {where} refused this node: {reason}")
    if not hmac.compare_digest(answer[:PROOF_LEN], mac(secret, b"verdict", nonce.encode(), text)):
        raise PermissionError(
            f"the head at {where} did not prove the cluster secret: the {WRONG_SECRET} differs "
            "between the hosts, or another process answered"
        )
    store.set(f"ack/{attempt}", "")  # NOTE: the head keeps the store up until we read it
    if text != b"ok":
        raise ValueError(text.decode(errors="replace"))


class _Head:
    """Rank 0's side: read attempts in order, refuse the bad ones, answer the rest."""

    def __init__(self, store: Any, config: ParallelConfig, secret: str, challenge: bytes) -> None:
        self.store, self.config, self.secret, self.challenge = store, config, secret, challenge
        self.next = 1  # the next join attempt to read
        self.joined: dict[int, tuple[int, str, dict[str, str]]] = {}  # rank → attempt, nonce, fp

    def read(self, attempt: int) -> tuple[int, str, dict[str, str]]:
        """An attempt's (rank, nonce, fingerprint), its proof checked before its body is parsed;
        raises Refused."""
        raw = self.store.get(f"join/{attempt}")
        if len(raw) > MAX_RECORD_BYTES:
            raise Refused(f"a join record of {len(raw)} bytes > {MAX_RECORD_BYTES}")
        proof, body = raw[:PROOF_LEN], raw[PROOF_LEN:]
        if not hmac.compare_digest(proof, mac(self.secret, b"join", self.challenge, body)):
            raise Refused(WRONG_SECRET)
        record = json.loads(body)  # NOTE: only a node that holds the secret gets this far
        rank, nonce, fp = record["rank"], record["nonce"], record["fingerprint"]
        size = self.config.tensor_parallel_size
        if type(rank) is not int or not 0 < rank < size:
            raise Refused(f"rank {rank!r} is not in [1, {size})")
        if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{32}", nonce):
            raise Refused("a join record without a 32-hex-digit nonce")
        if not isinstance(fp, dict) or not all(isinstance(v, str) for v in fp.values()):
            raise Refused("a join record whose fingerprint is not an object of strings")
        return rank, nonce, fp

    def refuse(self, attempt: int, reason: str) -> None:
        where = f"{self.config.master_addr}:{self.config.master_port}"
        logger.warning("refused a node joining %s (attempt %d): %s", where, attempt, reason)
        self.store.set(f"verdict/{attempt}", REFUSED + reason)

    def take(self, formed: bool) -> None:
        """Read every attempt posted so far: record the good ones (before `formed`), refuse the
        rest."""
        while self.store.check([f"join/{self.next}"]):
            attempt, self.next = self.next, self.next + 1
            try:
                rank, nonce, fp = self.read(attempt)
                if formed or rank in self.joined:
                    raise Refused(f"rank {rank} already joined this group")
            except Refused as e:
                self.refuse(attempt, str(e))
                continue
            except (ValueError, KeyError, TypeError, RecursionError) as e:  # proven, but malformed
                self.refuse(attempt, f"a malformed join record ({type(e).__name__})")
                continue
            self.joined[rank] = (attempt, nonce, fp)

    def gather(self, mine: dict[str, str], dead: Callable[[], str | None]) -> None:
        """Wait for every rank (bounded), then compare fingerprints."""
        config = self.config
        size, timeout = config.tensor_parallel_size, config.distributed_timeout
        start = time.monotonic()
        while pending := [r for r in range(1, size) if r not in self.joined]:
            if (reason := dead()) is not None:
                raise RuntimeError(reason)
            self.take(formed=False)
            pending = [r for r in pending if r not in self.joined]
            remote = [r for r in pending if config.node_of(r) != 0]
            waited = time.monotonic() - start
            if remote and waited > timeout:
                nodes = sorted({config.node_of(r) for r in remote})
                raise TimeoutError(
                    f"tensor-parallel ranks {remote} (nodes {nodes}) did not join "
                    f"{config.master_addr}:{config.master_port} within {timeout:g} s "
                    f"(--distributed-timeout): start `tokenmill worker` with --node-rank "
                    f"{', '.join(map(str, nodes))} there"
                )
            if pending and waited > max(timeout, LOCAL_START_TIMEOUT_S):
                raise TimeoutError(f"this host's tensor-parallel ranks {pending} did not start in "
                                   f"{max(timeout, LOCAL_START_TIMEOUT_S):g} s")  # fmt: skip
            if pending:
                time.sleep(0.05)  # NOTE: polling the store, bounded by the deadlines above
        diffs = []
        for r, (_, _, theirs) in sorted(self.joined.items()):
            fields = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in mine.items()
                      if theirs.get(k) != v]  # fmt: skip
            if fields:
                diffs.append(f"rank {r} (node {config.node_of(r)}): {', '.join(fields)}")
        if diffs:
            raise ValueError(
                "hosts disagree on the model or flags (theirs vs the head's): " + "; ".join(diffs)
            )

    def answer_all(self, verdict: str) -> None:
        """Every joined rank's verdict, proven by its nonce; wait (bounded) until they read it
        if it is a failure (the store goes away with this process)."""
        text = verdict.encode()
        for attempt, nonce, _ in self.joined.values():
            proof = mac(self.secret, b"verdict", nonce.encode(), text)
            self.store.set(f"verdict/{attempt}", proof + text)
        if verdict != "ok":
            acks = [f"ack/{attempt}" for attempt, _, _ in self.joined.values()]
            with contextlib.suppress(RuntimeError):
                self.store.wait(acks, timedelta(seconds=5))


class JoinGuard:
    """Refuses every join attempt after the group formed, on a thread with a store client of its
    own (a blocking wait on the head's client would hold up its other store calls)."""

    def __init__(self, head: _Head) -> None:
        self._head = head
        self._main_store = head.store
        head.store = connect_store(head.config, is_head=False, port=head.config.master_port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenmill-join-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        head = self._head
        with contextlib.suppress(RuntimeError, ConnectionError):
            while not self._stop.is_set():
                head.store.wait([f"join/{head.next}"], GUARD_WAIT)
                if not self._stop.is_set():
                    head.take(formed=True)

    def stop(self) -> None:
        """Wake the thread (an empty attempt it does not read) and join it."""
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._main_store.set(f"join/{self._head.next}", b"")
        self._thread.join(2.0)
