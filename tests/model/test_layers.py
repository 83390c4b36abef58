"""Layer-level checks: fast paged attention vs the float32 reference, and TP weight shards."""

from __future__ import annotations

import random

import pytest
import torch

from model.layers.attention import AttentionMetadata, reference_attention, sdpa_attention
from model.layers.embedding import VocabParallelEmbedding
from model.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from model.layers.norm import ResidualRMSNorm
from model.parallel import ParallelContext

H, KV, D, BS = 6, 2, 16, 4


def paged_case(query_lens: list[int], context_lens: list[int], seed: int = 0):
    """Random cache + a step whose rows write their K/V into shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(KV, num_blocks, BS, D, generator=g)
    v_cache = torch.randn(KV, num_blocks, BS, D, generator=g)
    free = list(range(num_blocks))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // BS) + 1)] for c in context_lens]  # one spare
    slots = [
        t[p // BS] * BS + p % BS
        for q, c, t in zip(query_lens, context_lens, tables, strict=True)
        for p in range(c - q, c)
    ]
    meta = AttentionMetadata.build(query_lens, context_lens, tables, slots, BS)
    t = sum(query_lens)
    q = torch.randn(t, H, D, generator=g)
    k = torch.randn(t, KV, D, generator=g)
    v = torch.randn(t, KV, D, generator=g)
    k_cache.view(KV, -1, D)[:, meta.slot_mapping] = k.transpose(0, 1)
    v_cache.view(KV, -1, D)[:, meta.slot_mapping] = v.transpose(0, 1)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([1, 1, 1], [5, 17, 9]),  # decodes of different lengths
        ([1], [8]),  # one decode, no padding
        ([11], [11]),  # one fresh prompt: causal on fresh K/V
        ([7], [20]),  # a chunk after a cached prefix
        ([5, 12, 3], [5, 12, 3]),  # several fresh prompts, padded among themselves
        ([1, 9, 1, 4, 1], [30, 13, 2, 4, 7]),  # mixed: decodes interleaved with chunks
    ],
)
def test_fast_path_matches_reference(query_lens: list[int], context_lens: list[int]) -> None:
    q, k, v, kc, vc, meta = paged_case(query_lens, context_lens)
    scale = D**-0.5
    fast = sdpa_attention(q, k, v, kc, vc, meta, scale)
    ref = reference_attention(q, k, v, kc, vc, meta, scale)
    assert fast.shape == (sum(query_lens), H, D)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.timeout(30)
def test_reference_reads_the_cache_not_garbage() -> None:
    """Changing a slot outside every context leaves outputs alone; inside it changes them."""
    q, k, v, kc, vc, meta = paged_case([1, 3], [6, 9], seed=3)
    base = sdpa_attention(q, k, v, kc, vc, meta, 0.25)
    used = {
        b
        for t, c in zip(meta.block_tables, meta.context_lens, strict=True)
        for b in t[: -(-c // BS)]
    }
    unused = next(b for b in range(kc.shape[1]) if b not in used)
    vc[:, unused] = 1e6
    torch.testing.assert_close(sdpa_attention(q, k, v, kc, vc, meta, 0.25), base)
    vc[:, meta.block_tables[0][0], 0] += 1.0
    assert not torch.allclose(sdpa_attention(q, k, v, kc, vc, meta, 0.25)[0], base[0])


def load(layer, param, full, shard_id=None) -> torch.Tensor:
    param.weight_loader(param, full, shard_id)
    return param.data.clone()


@pytest.mark.timeout(30)
def test_column_and_row_parallel_shards() -> None:
    full = torch.arange(8 * 6, dtype=torch.float32).view(8, 6)
    cols = [ColumnParallelLinear(6, 8, bias=True, ctx=ParallelContext(r, 2)) for r in range(2)]
    parts = [load(c, c.weight, full) for c in cols]
    assert torch.equal(parts[1], full[4:])
    assert torch.equal(torch.cat(parts), full)
    assert torch.equal(load(cols[1], cols[1].bias, torch.arange(8.0)), torch.arange(4.0, 8.0))
    rows = [RowParallelLinear(6, 8, ctx=ParallelContext(r, 3)) for r in range(3)]
    parts = [load(r, r.weight, full) for r in rows]
    assert torch.equal(parts[2], full[:, 4:])
    assert torch.equal(torch.cat(parts, dim=1), full)


@pytest.mark.timeout(30)
def test_merged_and_qkv_shards() -> None:
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    m = MergedColumnParallelLinear(4, [8, 8], ctx=ParallelContext(1, 2))
    load(m, m.weight, gate, 0)
    got = load(m, m.weight, up, 1)
    assert torch.equal(got, torch.cat([gate[4:], up[4:]]))

    # 4 heads of dim 2, 1 KV head, tp=2: q split, the single KV head replicated on both ranks
    q, k, v = torch.randn(8, 6), torch.randn(2, 6), torch.randn(2, 6)
    for rank in range(2):
        qkv = QKVParallelLinear(6, 2, 4, 1, ctx=ParallelContext(rank, 2))
        for shard, t in (("q", q), ("k", k), ("v", v)):
            got = load(qkv, qkv.weight, t, shard)
        assert (qkv.num_heads, qkv.num_kv_heads) == (2, 1)
        assert torch.equal(got, torch.cat([q[rank * 4 : rank * 4 + 4], k, v]))
    qkv = QKVParallelLinear(6, 2, 4, 2, ctx=ParallelContext(1, 2))
    for shard, t in (("q", q), ("k", torch.randn(4, 6)), ("v", v.repeat(2, 1))):
        got = load(qkv, qkv.weight, t, shard)
    assert torch.equal(got[:4], q[4:]) and torch.equal(got[6:], v.repeat(2, 1)[2:])
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible"):
        QKVParallelLinear(6, 2, 4, 1, ctx=ParallelContext(0, 3))


@pytest.mark.timeout(30)
def test_vocab_parallel_embedding_pads_last_shard() -> None:
    full = torch.randn(5, 3)
    embs = [VocabParallelEmbedding(5, 3, ParallelContext(r, 2)) for r in range(2)]
    parts = [load(e, e.weight, full) for e in embs]
    assert torch.equal(parts[0], full[:3])
    assert torch.equal(parts[1][:2], full[3:]) and torch.equal(parts[1][2], torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected shape \(5, 3\)"):
        embs[0].weight_loader(embs[0].weight, torch.randn(6, 3))


@pytest.mark.timeout(30)
def test_residual_rms_norm_matches_native_and_returns_sum() -> None:
    norm = ResidualRMSNorm(8, 1e-6)
    norm.weight.data = torch.randn(8)
    x, res = torch.randn(5, 8), torch.randn(5, 8)
    normed, new_res = norm(x, res)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(normed, norm.forward_native(x + res))
    normed0, res0 = norm(x)
    assert res0 is x
    torch.testing.assert_close(normed0, norm.forward_native(x))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_dense_matches_f_linear(rows: int) -> None:
    """The oneDNN prepacked fast path equals the plain F.linear oracle, and repacks on reload."""
    import torch.nn.functional as F

    from model.layers.linear import ColumnParallelLinear, dense

    torch.manual_seed(rows)
    layer = ColumnParallelLinear(96, 160, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(rows, 96)  # [rows, in]
    want = F.linear(x, layer.weight, layer.bias)  # [rows, out]
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-5)
    layer.weight_loader(layer.weight, torch.randn(160, 96))  # a new weight must be repacked
    torch.testing.assert_close(
        dense(layer, x, layer.weight, None), F.linear(x, layer.weight), atol=1e-4, rtol=1e-5
    )
