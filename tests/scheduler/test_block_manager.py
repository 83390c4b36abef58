"""BlockManager: exact block ids, ref counts, LRU eviction order, prefix hits, chained hashes."""

from __future__ import annotations

import pytest

from scheduler.block_manager import NULL_BLOCK, BlockManager, hash_block
from scheduler.sequence import Sequence

pytestmark = pytest.mark.timeout(30)


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens))


def compute(bm: BlockManager, s: Sequence, hits: list[int] | None = None) -> list[int] | None:
    """Allocate for every uncomputed token, mark them computed and cache the full blocks."""
    got = bm.allocate_slots(
        s, s.num_tokens - s.num_computed_tokens - len(hits or []) * bm.block_size, hits
    )
    if got is not None:
        s.num_computed_tokens = s.num_tokens
        bm.cache_full_blocks(s)
    return got


def test_allocate_and_free_exact_ids():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    assert bm.allocate_slots(a, 10) == [0, 1, 2]
    assert a.block_table == [0, 1, 2]
    assert [b.ref_count for b in bm.blocks[:4]] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 7
    a.num_computed_tokens = 10
    assert bm.allocate_slots(a, 2) == []  # 12 tokens still fit in 3 blocks
    assert bm.allocate_slots(a, 3) == [3]
    bm.check_integrity([a])
    bm.deallocate(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 10
    # never-cached blocks go back to the free list tail, tail block first
    assert list(bm.free) == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]
    assert bm.check_integrity()


def test_allocate_returns_none_and_changes_nothing_when_short():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq(range(9))  # 5 blocks
    assert bm.allocate_slots(a, 9) is None
    assert a.block_table == [] and bm.num_free_blocks == 4
    bm.check_integrity([a])


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq(range(10))
    compute(bm, a, [])
    assert bm.cached == {a.block_hashes[0]: 0, a.block_hashes[1]: 1}  # block 2 is partial
    b = seq([*range(8), 100, 101, 102])
    hits, num = bm.get_computed_blocks(b)
    assert (hits, num) == ([0, 1], 8)
    assert bm.allocate_slots(b, 3, hits) == [3]
    assert b.block_table == [0, 1, 3] and b.num_computed_tokens == 8
    assert [blk.ref_count for blk in bm.blocks[:4]] == [2, 2, 1, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (10 + 11, 8)
    bm.check_integrity([a, b])
    bm.deallocate(a)
    bm.deallocate(b)
    assert bm.num_free_blocks == 10 and bm.num_cached_free_blocks == 2
    bm.check_integrity()


def test_last_token_is_never_a_hit():
    bm = BlockManager(num_blocks=10, block_size=4)
    compute(bm, seq(range(8)), [])
    # the same 8 tokens: both blocks are cached, but the 8th token's logits are needed
    assert bm.get_computed_blocks(seq(range(8))) == ([0], 4)
    assert bm.get_computed_blocks(seq(range(9))) == ([0, 1], 8)


def test_chained_hash_same_tokens_other_parent_do_not_match():
    bm = BlockManager(num_blocks=10, block_size=2)
    compute(bm, seq([1, 2, 3, 4, 5]), [])
    assert hash_block(hash_block(None, [1, 2]), [3, 4]) != hash_block(
        hash_block(None, [9, 9]), [3, 4]
    )
    # second block's tokens [3, 4] are cached, but under parent [1, 2], not [9, 9]
    assert bm.get_computed_blocks(seq([9, 9, 3, 4, 5])) == ([], 0)
    assert bm.get_computed_blocks(seq([1, 2, 3, 4, 5])) == ([0, 1], 4)
    assert bm.get_computed_blocks(seq([1, 2, 9, 4, 5])) == ([0], 2)


def test_eviction_prefers_uncached_then_least_recently_used():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq([1, 2, 3, 4]), seq([5, 6, 7, 8])
    compute(bm, a, [])
    compute(bm, b, [])
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    bm.deallocate(a)
    bm.deallocate(b)
    assert list(bm.evictable) == [1, 0, 3, 2]  # tail blocks first: evicted first
    c = seq([1, 2, 0])  # hits block 0: it leaves the LRU, and returns as most recent
    hits, _ = bm.get_computed_blocks(c)
    assert compute(bm, c, hits) == [4]
    assert bm.blocks[0].ref_count == 1 and 0 not in bm.evictable
    bm.deallocate(c)
    assert list(bm.evictable) == [1, 3, 2, 0]
    assert list(bm.free) == [5, 4]
    d = seq(range(100, 112))  # 6 blocks: both free ones first (newest first), then LRU cached
    assert bm.allocate_slots(d, 12, []) == [4, 5, 1, 3, 2, 0]
    assert bm.cached == {} and bm.num_free_blocks == 0
    bm.check_integrity([d])
    bm.deallocate(d)
    assert bm.num_free_blocks == 6
    bm.check_integrity()


def test_resident_floor_bounds_the_blocks_ever_written():
    """On CPU a fresh block costs resident memory: past the floor, reuse resident blocks (free
    ones first, then the least recently used cached one) before touching a fresh block."""
    bm = BlockManager(num_blocks=8, block_size=2, resident_floor=4)
    a, b = seq([1, 2, 3, 4, 5]), seq([6, 7, 8, 9])
    compute(bm, a, [])  # blocks 0, 1 (cached), 2 (partial)
    assert (a.block_table, bm.num_resident) == ([0, 1, 2], 3)
    bm.deallocate(a)
    compute(bm, b, [])  # reuses the resident uncached block 2, then one fresh block (floor 4)
    assert (b.block_table, bm.num_resident) == ([2, 3], 4)
    bm.deallocate(b)
    c = seq([10, 11, 12, 13, 14, 15])  # floor reached, nothing uncached: evict LRU cached ones
    assert compute(bm, c, []) == [1, 0, 3]  # LRU: a's blocks, then b's tail; b's head stays
    assert bm.num_resident == 4 and bm.blocks[2].token_ids == (6, 7)
    d = seq([20, 21, 22, 23, 24, 25, 26, 27, 28, 29])  # more than the resident pool holds
    assert compute(bm, d, []) == [2, 4, 5, 6, 7]  # the last cached block, then fresh ones
    assert bm.num_resident == 8 and bm.num_free_blocks == 0
    bm.check_integrity([c, d])


def test_hit_on_evictable_block_counts_against_free_space():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4, 5])
    compute(bm, a, [])
    bm.deallocate(a)  # blocks 0, 1 cached-free, 2 free
    b = seq([1, 2, 3, 4, 5, 6, 7])  # hits 0, 1, needs 2 more: only 1 left
    hits, _ = bm.get_computed_blocks(b)
    assert hits == [0, 1]
    assert bm.allocate_slots(b, 3, hits) is None
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.allocate_slots(b, 1, hits) == [2]
    bm.check_integrity([b])


def test_duplicate_full_block_is_not_cached_twice():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq([1, 2, 3]), seq([1, 2, 4])
    bm.allocate_slots(a, 3, [])
    bm.allocate_slots(b, 3, [])  # no hit yet: a's blocks are not computed
    for s in (a, b):
        s.num_computed_tokens = 3
        bm.cache_full_blocks(s)
    assert bm.cached == {a.block_hashes[0]: 0}
    assert bm.blocks[2].hash is None
    bm.deallocate(a)
    bm.deallocate(b)
    assert list(bm.evictable) == [0] and list(bm.free) == [4, 5, 1, 3, 2]
    bm.check_integrity()


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    compute(bm, seq([1, 2, 3, 4, 5]), [])
    assert bm.cached == {}
    assert bm.get_computed_blocks(seq([1, 2, 3, 4, 5])) == ([], 0)
    assert (bm.prefix_queries, bm.prefix_hits) == (0, 0)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockManager(0, 16)


def test_hash_is_sha256_of_parent_and_tokens():
    import hashlib
    from array import array

    first = hash_block(None, [1, 2])
    assert len(first) == 32 and first != hash_block(None, [2, 1])
    h = hashlib.sha256(first)
    h.update(array("q", [3, 4]).tobytes())
    assert hash_block(first, [3, 4]) == h.digest()


def test_forced_key_collision_is_never_reused(monkeypatch):
    """Every block gets the same key: a hit must still match tokens and parent, or it misses."""
    import scheduler.block_manager as block_manager

    monkeypatch.setattr(block_manager, "hash_block", lambda parent, tokens: b"same key")
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    compute(bm, a, [])
    assert bm.cached == {b"same key": 0}  # the second full block collides: left uncached
    other = seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "b")  # different first block, same key
    assert bm.get_computed_blocks(other) == ([], 0)
    shifted = seq([1, 2, 3, 4, 1, 2, 3, 4, 9], "c")  # block 1 has block 0's tokens and key
    assert bm.get_computed_blocks(shifted) == ([0], 4)  # only the true prefix block is reused
    same = seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "d")
    assert bm.get_computed_blocks(same) == ([0], 4)
    bm.deallocate(a)
    bm.check_integrity()


def test_sliding_window_frees_blocks_behind_the_next_query():
    """window 6, blocks of 4: the query at position p sees p-5..p, so block i goes once
    4 * (i + 1) <= p - 5; freed blocks stay cached (evictable) and the table keeps NULL_BLOCK."""
    bm = BlockManager(num_blocks=8, block_size=4, sliding_window=6)
    a = seq(range(9))
    assert bm.allocate_slots(a, 9) == [0, 1, 2]  # nothing computed yet: nothing to free
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    a.token_ids.append(9)
    assert bm.allocate_slots(a, 1) == []  # next query at 9 sees 4..9: block 0 (0..3) goes
    assert a.block_table == [NULL_BLOCK, 1, 2]
    assert bm.num_window_freed_blocks == 1
    assert list(bm.evictable) == [0] and bm.blocks[0].ref_count == 0
    a.num_computed_tokens = 13
    a.token_ids.extend(range(10, 14))
    assert bm.allocate_slots(a, 1) == [3]  # query at 13 sees 8..13: block 1 (4..7) goes
    assert a.block_table == [NULL_BLOCK, NULL_BLOCK, 2, 3]
    assert bm.num_window_freed_blocks == 2
    bm.check_integrity([a])
    # another prompt with the same first 4 tokens still hits the freed, cached block 0
    b = seq([0, 1, 2, 3, 50, 51], rid="b")
    assert bm.get_computed_blocks(b) == ([0], 4)
    bm.deallocate(a)
    assert bm.num_free_blocks == 8 and bm.check_integrity()


def test_sliding_window_drops_hits_the_window_has_left():
    """A prefix hit of 3 blocks with window 4 keeps only the block the next query sees."""
    bm = BlockManager(num_blocks=8, block_size=4, sliding_window=4)
    first = seq(range(13))
    compute(bm, first, [])
    bm.deallocate(first)
    again = seq(range(14), rid="again")
    hits, n = bm.get_computed_blocks(again)
    assert (hits, n) == ([0, 1, 2], 12)
    assert bm.allocate_slots(again, 2, hits) == [3]
    # next query at 12 sees 9..12: blocks 0 and 1 (0..7) go back at once
    assert again.block_table == [NULL_BLOCK, NULL_BLOCK, 2, 3]
    assert bm.blocks[2].ref_count == 1 and bm.num_window_freed_blocks == 2
    bm.check_integrity([again])
    bm.deallocate(again)
    assert bm.num_free_blocks == 8
