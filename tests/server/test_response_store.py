"""ResponseStore: LRU by count and by bytes, per-owner visibility, history along the chain."""

from __future__ import annotations

import json

import pytest

from server.auth import owner_of
from server.response_store import ResponseStore

pytestmark = pytest.mark.timeout(10)


def response(rid: str, prev: str | None = None, text: str = "hi") -> dict:
    out = [{"type": "message", "id": f"out_{rid}", "role": "assistant",
            "content": [{"type": "output_text", "text": text}]}]  # fmt: skip
    return {"id": rid, "previous_response_id": prev, "output": out}


def items(rid: str) -> list[dict]:
    return [{"type": "message", "id": f"in_{rid}", "role": "user", "content": []}]


def size(rid: str, prev: str | None = None, text: str = "hi") -> int:
    return len(json.dumps(response(rid, prev, text))) + len(json.dumps(items(rid)))


def test_least_recently_used_go_first_past_the_count() -> None:
    store = ResponseStore(max_entries=3, max_bytes=10**6)
    for rid in ("a", "b", "c"):
        assert store.put("", response(rid), items(rid))
    assert store.get("a", "") is not None  # a is now the most recently used
    store.put("", response("d"), items("d"))
    assert list(store._entries) == ["c", "a", "d"]
    assert store.get("b", "") is None and len(store) == 3
    assert store.num_bytes == size("c") + size("a") + size("d")


def test_bytes_bound_evicts_and_refuses_what_never_fits() -> None:
    store = ResponseStore(max_entries=100, max_bytes=2 * size("a") + 5)
    for rid in ("a", "b", "c"):
        store.put("", response(rid), items(rid))
    assert list(store._entries) == ["b", "c"] and store.num_bytes == 2 * size("a")
    assert not store.put("", response("big", text="x" * 1000), items("big"))
    assert list(store._entries) == ["b", "c"]
    # replacing an entry counts its bytes once
    store.put("", response("c"), items("c"))
    assert store.num_bytes == 2 * size("a")
    assert not ResponseStore(max_entries=0, max_bytes=10**6).put("", response("a"), items("a"))


def test_an_owner_sees_only_its_own() -> None:
    mine, theirs = owner_of([(b"authorization", b"Bearer k1")]), owner_of([(b"x-api-key", b"k2")])
    assert mine != theirs and len(mine) == 64 and "k1" not in mine
    assert owner_of([(b"x-api-key", b"k1")]) == mine and owner_of([]) == ""
    store = ResponseStore(max_entries=10, max_bytes=10**6)
    store.put(mine, response("a"), items("a"))
    assert store.get("a", theirs) is None and not store.delete("a", theirs)
    assert store.history("a", theirs) is None
    assert store.get("a", mine) is not None and store.delete("a", mine)
    assert store.get("a", mine) is None and store.num_bytes == 0


def test_history_walks_the_chain_oldest_first() -> None:
    store = ResponseStore(max_entries=10, max_bytes=10**6)
    store.put("", response("a"), items("a"))
    store.put("", response("b", "a"), items("b"))
    store.put("", response("c", "b"), items("c"))
    ids = [it["id"] for it in store.history("c", "")]
    assert ids == ["in_a", "out_a", "in_b", "out_b", "in_c", "out_c"]
    store.delete("a", "")
    assert store.history("c", "") is None  # a broken chain is not a silently shorter history
    store.put("", response("loop", "loop"), items("loop"))
    assert [it["id"] for it in store.history("loop", "")] == ["in_loop", "out_loop"]
