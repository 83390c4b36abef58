"""Paged attention: write K/V by slot mapping, read each sequence's context via its block table.

Decode rows go in a few groups of similar context length (one SDPA each, grouped heads as query
rows); prefill rows are padded only among themselves; sliding windows and soft-capping on every
path. `reference` is the float32 oracle. The index tensors are model/layers/attention_metadata.py's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.attention_metadata import AttentionMetadata, DecodeGroup, WindowMasks


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Fast path: one SDPA per decode group, one for all prefill rows -> [num_tokens, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    groups = meta.decode_groups
    masks = meta.windowed(window) if window is not None else None
    decode = masks.decode if masks is not None else tuple((g, g.keep) for g in groups)
    if meta.num_prefill_seqs == 0 and len(groups) == 1:
        return _decode(q, k_cache, v_cache, decode[0][0], decode[0][1], scale, soft_cap)
    if meta.num_decode == 0:
        return _prefill(q, k, v, k_cache, v_cache, meta, masks, scale, soft_cap)
    out = q.new_empty(num_tokens, num_heads, head_dim)
    for group, keep in decode:
        rows = group.rows
        o = _decode(q.index_select(0, rows), k_cache, v_cache, group, keep, scale, soft_cap)
        out.index_copy_(0, rows, o)
    if meta.num_prefill_seqs:
        rows = meta.prefill_rows
        if meta.prefill_block_tables is None:  # fresh K/V are only read on the causal fast path
            k, v = k[rows], v[rows]
        o = _prefill(q[rows], k, v, k_cache, v_cache, meta, masks, scale, soft_cap)
        out.index_copy_(0, rows, o)
    return out


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    soft_cap: float | None,
    causal: bool = False,
) -> torch.Tensor:
    """SDPA on [B, H, Lq, D] x [B, kv_heads, Lk, D]; with soft_cap (Gemma 2: SDPA has none),
    explicit scores: tanh(s / cap) * cap before the mask and softmax."""
    gqa = q.shape[1] != k.shape[1]
    if soft_cap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, is_causal=causal, scale=scale, enable_gqa=gqa
        )
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    s = torch.tanh(s / soft_cap) * soft_cap
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(s.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)


def _decode(
    q, k_cache, v_cache, group: DecodeGroup, keep, scale: float, soft_cap: float | None
) -> torch.Tensor:
    """Grouped heads become query rows: [B, kv_heads, group, D] against [B, kv_heads, L, D]."""
    b, num_heads, head_dim = q.shape
    num_kv, _, bs, _ = k_cache.shape
    span = -(-group.span // bs) * bs
    if group.first_block is not None:  # consecutive blocks (a lone stream, usually): no copy
        blocks = slice(group.first_block, group.first_block + span // bs)
        keys = k_cache[:, blocks].view(num_kv, 1, span, head_dim)
        values = v_cache[:, blocks].view(num_kv, 1, span, head_dim)
    else:
        keys = k_cache.index_select(1, group.block_tables).view(num_kv, b, span, head_dim)
        values = v_cache.index_select(1, group.block_tables).view(num_kv, b, span, head_dim)
    if span != group.span:  # one row: its exact context
        keys, values = keys[:, :, : group.span], values[:, :, : group.span]
    keys, values = keys.to(q.dtype), values.to(q.dtype)  # no-op unless the cache is narrower
    o = _attend(
        q.view(b, num_kv, num_heads // num_kv, head_dim),
        keys.transpose(0, 1),
        values.transpose(0, 1),
        keep,
        scale,
        soft_cap,
    )  # [B, kv_heads, group, D]
    return o.reshape(b, num_heads, head_dim)


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[num_kv_heads, B, max_blocks * block_size, head_dim] context of each sequence (one copy)."""
    num_kv, _, bs, head_dim = cache.shape
    b, nb = tables.shape
    return cache.index_select(1, tables.view(-1)).view(num_kv, b, nb * bs, head_dim)


def _prefill(
    q, k, v, k_cache, v_cache, meta: AttentionMetadata, masks: WindowMasks | None, scale, soft_cap
) -> torch.Tensor:
    """Prompt chunks, padded only among themselves; causal within the chunk after cached context."""
    t, num_heads, head_dim = q.shape
    if meta.prefill_block_tables is None:  # one sequence, nothing cached: causal on fresh K/V
        band = masks.causal_mask if masks is not None else None
        o = _attend(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            band,
            scale,
            soft_cap,
            causal=band is None,
        )  # [1, H, T, D]
        return o[0].transpose(0, 1)
    p, max_q = meta.num_prefill_seqs, meta.max_prefill_query
    if meta.prefill_pad is not None:
        qp = q.new_zeros(p * max_q, num_heads, head_dim).index_copy_(0, meta.prefill_pad, q)
    else:
        qp = q
    qp = qp.view(p, max_q, num_heads, head_dim).transpose(1, 2)  # [P, H, max_q, D]
    tables, mask = meta.prefill_block_tables, meta.prefill_mask
    if masks is not None:
        mask = masks.prefill_mask
        tables = masks.prefill_tables if masks.prefill_tables is not None else tables
    keys = _gather(k_cache, tables).transpose(0, 1).to(q.dtype)  # [P, kv, L, D]
    values = _gather(v_cache, tables).transpose(0, 1).to(q.dtype)
    o = _attend(qp, keys, values, mask, scale, soft_cap)  # [P, H, max_q, D]
    o = o.transpose(1, 2).reshape(p * max_q, num_heads, head_dim)
    return o if meta.prefill_pad is None else o[meta.prefill_pad]


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """The oracle: one sequence at a time, float32, explicit scores, mask and softmax."""
    num_tokens, num_heads, head_dim = q.shape
    bs, num_kv = meta.block_size, k_cache.shape[0]
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    start = 0
    for qlen, ctx, table in zip(meta.query_lens, meta.context_lens, meta.block_tables, strict=True):
        blocks = torch.tensor(table[: -(-ctx // bs)], dtype=torch.long, device=q.device)
        keys = k_cache[:, blocks].reshape(num_kv, -1, head_dim)[:, :ctx].transpose(0, 1).float()
        values = v_cache[:, blocks].reshape(num_kv, -1, head_dim)[:, :ctx].transpose(0, 1).float()
        keys = keys.repeat_interleave(num_heads // num_kv, dim=1)  # [ctx, H, D]
        values = values.repeat_interleave(num_heads // num_kv, dim=1)
        qs = q[start : start + qlen].float()  # [qlen, H, D]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale  # [H, qlen, ctx]
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)
        kpos = torch.arange(ctx, device=q.device)[None, :]
        future = kpos > qpos[:, None]  # [qlen, ctx]
        if window is not None:
            future |= kpos <= qpos[:, None] - window  # out of the window counts as unseen
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out[start : start + qlen] = torch.einsum("hqk,khd->qhd", probs, values)
        start += qlen
    return out.to(q.dtype)


# NOTE: the dispatch point for FlashAttention / FlashInfer on CUDA: same signature, new entry.
BACKENDS = {"sdpa": sdpa_attention, "reference": reference_attention}


class Attention(nn.Module):
    """Writes this step's K/V into the layer's paged cache, then attends through block tables."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: str = "sdpa",
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; have {', '.join(BACKENDS)}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window  # None: every key; else the last this many
        self.logits_soft_cap = logits_soft_cap
        self.backend = backend
        self.k_cache: torch.Tensor | None = None  # [kv_heads, num_blocks, block_size, head_dim]
        self.v_cache: torch.Tensor | None = None

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, kv_heads, D] -> [T, H * D]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention has no KV cache bound: call bind_kv_cache first")
        nkv, d = self.num_kv_heads, self.head_dim
        dt = self.k_cache.dtype  # --kv-cache-dtype may store narrower than the activations
        self.k_cache.view(nkv, -1, d).index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(dt))
        self.v_cache.view(nkv, -1, d).index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(dt))
        o = BACKENDS[self.backend](
            q,
            k,
            v,
            self.k_cache,
            self.v_cache,
            meta,
            self.scale,
            self.sliding_window,
            self.logits_soft_cap,
        )
        return o.reshape(q.shape[0], self.num_heads * self.head_dim)
