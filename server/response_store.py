"""Stored responses (/v1/responses with store): a bounded LRU by count and by bytes, each entry
visible only to the API key that stored it."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredResponse:
    """One response and its own input items, kept as JSON text (so the byte bound is the memory
    it holds, not a fraction of it), and whose it is. The history before it is its previous
    response's entry (a chain, so no history is copied)."""

    owner: str  # a digest of the API key that stored it ("" without --api-key)
    response_json: str
    input_items_json: str
    previous_response_id: str | None

    @property
    def num_bytes(self) -> int:
        return len(self.response_json) + len(self.input_items_json)

    @property
    def response(self) -> dict[str, Any]:
        return json.loads(self.response_json)

    @property
    def input_items(self) -> list[dict[str, Any]]:
        return json.loads(self.input_items_json)


class ResponseStore:
    """Least recently used go first, past `max_entries` responses or `max_bytes` of JSON."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.num_bytes = 0
        # NOTE: a dict is the LRU order: insertion order, pop + re-insert on use
        self._entries: dict[str, StoredResponse] = {}
        self._lock = threading.Lock()  # routes run on the event loop and on offload threads

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> bool:
        """Store (or replace) a response; False if it alone is over the byte bound."""
        if self.max_entries < 1:
            return False
        prev = response.get("previous_response_id")
        entry = StoredResponse(owner, json.dumps(response), json.dumps(input_items), prev)
        size = entry.num_bytes
        if size > self.max_bytes:
            logger.warning(
                "response %s not stored: %d bytes > --max-stored-responses-bytes %d",
                response["id"],
                size,
                self.max_bytes,
            )
            return False
        with self._lock:
            old = self._entries.pop(response["id"], None)
            if old is not None:
                self.num_bytes -= old.num_bytes
            self._entries[response["id"]] = entry
            self.num_bytes += size
            while len(self._entries) > self.max_entries or self.num_bytes > self.max_bytes:
                evicted = self._entries.pop(next(iter(self._entries)))
                self.num_bytes -= evicted.num_bytes
        return True

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The entry if it exists and is `owner`'s (else None, as if unknown); marks it used."""
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return None
            self._entries[response_id] = self._entries.pop(response_id)
            return entry

    def delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return False
            del self._entries[response_id]
            self.num_bytes -= entry.num_bytes
            return True

    def history(self, response_id: str, owner: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including `response_id`: every input and output item
        along its chain, oldest first; None if it or an earlier link is gone."""
        chain: list[StoredResponse] = []
        seen: set[str] = set()
        next_id: str | None = response_id
        while next_id is not None and next_id not in seen:
            seen.add(next_id)
            entry = self.get(next_id, owner)
            if entry is None:
                return None
            chain.append(entry)
            next_id = entry.previous_response_id
        items: list[dict[str, Any]] = []
        for entry in reversed(chain):
            items += entry.input_items + entry.response["output"]
        return items
