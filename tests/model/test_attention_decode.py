"""Decode rows grouped by context length (and the no-copy view for one row) vs the reference."""

from __future__ import annotations

import random

import pytest
import torch

from model.layers import attention_metadata
from model.layers.attention import AttentionMetadata, reference_attention, sdpa_attention

H, KV, D, BS = 6, 2, 16, 4


def paged_case(query_lens: list[int], context_lens: list[int], seed: int):
    """Random cache + a step whose rows write their K/V into shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // BS) + 1 for c in context_lens)
    k_cache = torch.randn(KV, num_blocks, BS, D, generator=g)
    v_cache = torch.randn(KV, num_blocks, BS, D, generator=g)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // BS) + 1)] for c in context_lens]
    slots = [
        t[p // BS] * BS + p % BS
        for q, c, t in zip(query_lens, context_lens, tables, strict=True)
        for p in range(c - q, c)
    ]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, BS)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, n, D, generator=g) for n in (H, KV, KV))
    k_cache.view(KV, -1, D)[:, meta.slot_mapping] = k.transpose(0, 1)
    v_cache.view(KV, -1, D)[:, meta.slot_mapping] = v.transpose(0, 1)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(6))
def test_grouped_decodes_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(12, 80)
    context_lens = [rng.choice([rng.randint(1, 20), rng.randint(100, 400)]) for _ in range(n)]
    query_lens = [1] * n
    if seed % 2:  # odd seeds mix prompt chunks in between the decodes
        for j in rng.sample(range(n), 3):
            query_lens[j] = rng.randint(2, min(context_lens[j], 9)) if context_lens[j] > 1 else 1
    q, k, v, kc, vc, meta = paged_case(query_lens, context_lens, seed)
    assert len(meta.decode_groups) >= 2
    fast = sdpa_attention(q, k, v, kc, vc, meta, D**-0.5)
    ref = reference_attention(q, k, v, kc, vc, meta, D**-0.5)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(30)
def test_grouping_partitions_rows_and_cuts_padding() -> None:
    rng = random.Random(1)
    ctx = [rng.randint(1, 5000) for _ in range(300)]  # > 64 distinct block counts: coarsened
    groups = attention_metadata._group_by_blocks(list(range(300)), ctx, 16)
    assert sorted(i for grp in groups for i in grp) == list(range(300))
    assert all(grp == sorted(grp) for grp in groups)  # each group keeps the batch order
    assert 2 <= len(groups) < 64
    padded = sum(len(grp) * max(-(-ctx[i] // 16) for i in grp) for grp in groups)
    assert padded < 0.7 * 300 * max(-(-c // 16) for c in ctx)
    assert attention_metadata._group_by_blocks([0, 1], [16, 32], 16) == [
        [0, 1]
    ]  # not worth a group


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ctx", [1, 4, 7, 16])
def test_one_row_on_consecutive_blocks_reads_a_view(ctx: int) -> None:
    g = torch.Generator().manual_seed(ctx)
    kc, vc = torch.randn(2, KV, 12, BS, D, generator=g)
    table = [3, 4, 5, 6, 7]  # consecutive, with spare blocks past the context
    slot = table[(ctx - 1) // BS] * BS + (ctx - 1) % BS
    chunk_slots = [9 * BS + 2, 9 * BS + 3, 10 * BS]  # a 3-token chunk at positions 2..4
    for query_lens, context_lens in (([1], [ctx]), ([1, 3], [ctx, 5])):
        tables = [table, [9, 10]][: len(query_lens)]
        slots = [slot] + chunk_slots[: sum(query_lens) - 1]
        meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, BS)
        assert meta.decode_groups[0].first_block == 3
        t = sum(query_lens)
        q, k, v = (torch.randn(t, n, D, generator=g) for n in (H, KV, KV))
        fast = sdpa_attention(q, k, v, kc, vc, meta, 0.3)
        ref = reference_attention(q, k, v, kc, vc, meta, 0.3)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("window", "soft_cap"), [(5, None), (13, None), (None, 2.0), (7, 3.0)])
def test_windows_and_soft_cap_match_reference(seed: int, window, soft_cap) -> None:
    """Decode groups (narrowed to the window's blocks), chunks after cached context, a fresh
    prompt on the causal path: every path against the float32 oracle."""
    rng = random.Random(seed)
    n = rng.randint(6, 30)
    context_lens = [rng.choice([rng.randint(1, 12), rng.randint(30, 120)]) for _ in range(n)]
    query_lens = [1] * n
    for j in rng.sample(range(n), 2):  # prompt chunks, some longer than the window
        query_lens[j] = min(context_lens[j], rng.randint(2, 20))
    q, k, v, kc, vc, meta = paged_case(query_lens, context_lens, seed)
    fast = sdpa_attention(q, k, v, kc, vc, meta, 0.3, window, soft_cap)
    ref = reference_attention(q, k, v, kc, vc, meta, 0.3, window, soft_cap)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if window is not None:  # the window changes the answer: the masks were not a no-op
        unwindowed = sdpa_attention(q, k, v, kc, vc, meta, 0.3, None, soft_cap)
        assert (fast - unwindowed).abs().max() > 1e-3
        narrowed = [g for g, _ in meta.windowed(window).decode]
        assert max(g.span for g in narrowed) <= (-(-(window - 1) // BS) + 1) * BS


@pytest.mark.timeout(30)
@pytest.mark.parametrize("t", [3, 9, 20])
def test_fresh_prompt_window_matches_reference(t: int) -> None:
    """One fresh prompt (no block tables): the causal fast path with the window's band."""
    q, k, v, kc, vc, meta = paged_case([t], [t], seed=t)
    assert meta.prefill_block_tables is None
    for window, cap in ((4, None), (4, 1.5), (64, None)):
        fast = sdpa_attention(q, k, v, kc, vc, meta, 0.25, window, cap)
        ref = reference_attention(q, k, v, kc, vc, meta, 0.25, window, cap)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
