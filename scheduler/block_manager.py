"""BlockManager: the paged KV pool: free lists, ref counts, prefix caching by chained hashes."""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter
from dataclasses import dataclass

from scheduler.sequence import Sequence

logger = logging.getLogger(__name__)

_ROOT_HASH = b"tokenmill-prefix-cache-v1"  # parent of a sequence's first block
# a block_table entry whose block went back to the pool: behind every layer's sliding window
NULL_BLOCK = -1


def hash_block(parent_hash: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Chained sha256: a block matches only if its tokens AND every block before it match."""
    # NOTE: cryptographic, so a crafted prompt cannot collide with another tenant's block and be
    # served its KV (vLLM's CVE-2025-25183); hits are also compared token by token
    h = hashlib.sha256(_ROOT_HASH if parent_hash is None else parent_hash)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is registered in the prefix cache
    parent_hash: bytes | None = None  # the key of the block before it (None: first block)
    token_ids: tuple[int, ...] | None = None  # its tokens, compared on every hit


class BlockManager:
    """Hands out KV blocks to sequences; full computed blocks stay reusable until evicted (LRU).

    Free blocks are two ordered sets (dicts, oldest first): `free` (uncached) and `evictable`
    (ref count 0, still cached). A new block is a resident free one (newest first), else a fresh
    one while fewer than `resident_floor` (None: all) are resident, else the least recently used
    cached one, else a fresh one: on CPU the pool's resident pages follow the working set.
    `allocate_slots` returns None when blocks run out: the scheduler's signal to preempt.
    With `sliding_window` (a model whose every layer is windowed) a sequence's blocks that no
    future query can see go back to the pool as it advances; its table keeps NULL_BLOCK there.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        resident_floor: int | None = None,
        sliding_window: int | None = None,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.evictable: dict[int, None] = {}
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.num_resident = 0  # blocks [0, num_resident) have been handed out at least once
        self.resident_floor = num_blocks if resident_floor is None else resident_floor
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # prompt tokens found
        self.sliding_window = sliding_window
        self.num_window_freed_blocks = 0  # blocks released behind a sliding window, in total

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: never-cached free blocks plus evictable cached ones."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Extend `seq.block_hashes` to cover its first `num_blocks` full blocks."""
        bs, hashes = self.block_size, seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(
                hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs : (i + 1) * bs])
            )
        return hashes

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], int]:
        """Longest cached prefix of a sequence that computes from scratch: (block ids, tokens)."""
        # NOTE: the last token is never served from cache (vLLM's num_tokens - 1 cap): we need
        # its logits; prompt logprobs and MEAN/CLS pooling need every position's (no hits)
        if (
            not self.enable_prefix_caching
            or seq.num_computed_tokens > 0
            or seq.needs_every_position
        ):
            return [], 0
        bs, num_full = self.block_size, (seq.num_tokens - 1) // self.block_size
        hit: list[int] = []
        hashes = self._hashes(seq, num_full)
        for i, h in enumerate(hashes):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            parent = hashes[i - 1] if i else None
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            if block.token_ids != tokens or block.parent_hash != parent:
                logger.warning("prefix cache key collision on block %d: not reused", block_id)
                break
            hit.append(block_id)
        return hit, len(hit) * self.block_size

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Grow `seq.block_table` so `num_new_tokens` more tokens fit after its computed ones.

        Args:
            seq: its KV covers `seq.num_computed_tokens` tokens.
            num_new_tokens: tokens to be computed this step.
            new_computed_blocks: prefix-cache hits from `get_computed_blocks` at admission (None
                while running): appended first, advancing `num_computed_tokens` and the stats.
        Returns:
            The newly allocated block ids, or None (nothing changed) when the pool is short.
        """
        hits = new_computed_blocks or []
        self.free_outside_window(seq)
        num_tokens = seq.num_computed_tokens + len(hits) * self.block_size + num_new_tokens
        num_new = max(-(-num_tokens // self.block_size) - len(seq.block_table) - len(hits), 0)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if num_new + revived > self.num_free_blocks:
            return None
        for b in hits:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.evictable[b]
            block.ref_count += 1
            seq.block_table.append(b)
        if new_computed_blocks is not None:
            seq.num_computed_tokens += len(hits) * self.block_size
            seq.num_hashed_blocks = len(hits)
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += len(hits) * self.block_size
        new_blocks = [self._pop_free() for _ in range(num_new)]
        seq.block_table.extend(new_blocks)
        if hits:
            self.free_outside_window(seq)  # hits the window has already left
        return new_blocks

    def free_outside_window(self, seq: Sequence) -> int:
        """Release the blocks wholly before the sliding window of the next query; returns how many.

        NOTE: the next token computed sits at num_computed_tokens and sees the `sliding_window`
        positions ending there; later queries see less. Freed blocks stay in the prefix cache
        (their K/V do not change), so another prompt can still hit them.
        """
        if self.sliding_window is None:
            return 0
        first_seen = seq.num_computed_tokens - self.sliding_window + 1
        end = min(max(first_seen, 0) // self.block_size, len(seq.block_table))
        start = end
        while start > 0 and seq.block_table[start - 1] != NULL_BLOCK:  # freed ones are a prefix
            start -= 1
        for i in range(start, end):  # oldest first: the LRU order evicts them first
            self._release(seq.block_table[i])
            seq.block_table[i] = NULL_BLOCK
        self.num_window_freed_blocks += end - start
        return end - start

    def _release(self, b: int) -> None:
        block = self.blocks[b]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {b} freed twice"
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable[b] = None
            else:
                self.free[b] = None

    def _pop_free(self) -> int:
        """A resident uncached block, else a fresh one under the floor, else evict the least
        recently used cached block, else a fresh one (class docstring)."""
        newest = next(reversed(self.free), None)
        if newest is not None and (
            newest < self.num_resident
            or not self.evictable
            or self.num_resident < self.resident_floor
        ):
            # NOTE: fresh blocks sit at the front of `free` in id order, resident ones after them
            b = newest if newest < self.num_resident else next(iter(self.free))
            del self.free[b]
            self.num_resident = max(self.num_resident, b + 1)
        else:
            b = next(iter(self.evictable))
            del self.evictable[b]
            block = self.blocks[b]
            del self.cached[block.hash]
            block.hash = block.parent_hash = block.token_ids = None
        self.blocks[b].ref_count = 1
        return b

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_hashed_blocks:
            return
        bs, hashes = self.block_size, self._hashes(seq, num_full)
        for i in range(seq.num_hashed_blocks, num_full):
            if seq.block_table[i] == NULL_BLOCK:  # freed behind the window before it was hashed
                continue
            block = self.blocks[seq.block_table[i]]
            # NOTE: a block whose hash another block already holds stays uncached (no duplicates)
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                block.parent_hash = hashes[i - 1] if i else None
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                self.cached[hashes[i]] = block.block_id
        seq.num_hashed_blocks = num_full

    def free_tail(self, seq: Sequence) -> int:
        """Release the blocks past the sequence's tokens: allocated for draft tokens it rejected
        (never hashed: only full blocks of computed tokens are); returns how many."""
        keep = -(-seq.num_tokens // self.block_size)
        tail = seq.block_table[keep:]
        del seq.block_table[keep:]
        for b in reversed(tail):
            self._release(b)
        return len(tail)

    def deallocate(self, seq: Sequence) -> None:
        """Release the sequence's blocks, tail first (evicted first); it keeps 0 computed tokens."""
        for b in reversed(seq.block_table):
            if b != NULL_BLOCK:
                self._release(b)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def check_integrity(self, seqs: list[Sequence] | tuple[Sequence, ...] = ()) -> bool:
        """Assert every block is free, evictable or used (exactly one), the cache map matches, and
        ref counts match the given block tables."""
        for b in self.blocks:
            assert b.ref_count >= 0, f"block {b.block_id} ref count {b.ref_count}"
            in_free, in_evictable = b.block_id in self.free, b.block_id in self.evictable
            assert (b.ref_count == 0) == (in_free or in_evictable), f"block {b.block_id} lost"
            assert not (in_free and b.hash is not None), f"free block {b.block_id} has a hash"
            assert not (in_evictable and b.hash is None), f"evictable block {b.block_id} unhashed"
            if b.hash is not None:
                assert self.cached.get(b.hash) == b.block_id, f"block {b.block_id} hash unmapped"
        assert sum(b.hash is not None for b in self.blocks) == len(self.cached), "stale hashes"
        if seqs:
            refs = Counter(b for seq in seqs for b in seq.block_table if b != NULL_BLOCK)
            for b in self.blocks:
                assert refs[b.block_id] == b.ref_count, (
                    f"block {b.block_id}: ref count {b.ref_count} but {refs[b.block_id]} block "
                    "tables hold it"
                )
        return True
