"""Paged attention: write K/V by slot mapping, read each sequence's context via its block table.

Decode rows go in a few groups of similar context length (one SDPA each, grouped heads as query
rows); prefill rows are padded only among themselves. `reference` is the float32 oracle.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# A decode group costs this many extra block-rows of padding in fixed per-layer overhead (about
# six kernel launches); rows are split into groups by context only where that saves more padding.
GROUP_COST_BLOCKS = 12
MAX_GROUP_CANDIDATES = 64  # distinct block counts the grouping DP considers (keeps it ~O(4k))


@dataclass(frozen=True, slots=True)
class DecodeGroup:
    """Decode rows of similar context length, padded only to the longest context among them."""

    rows: torch.Tensor | None  # [b] token rows; None: every token row, in order
    block_tables: torch.Tensor  # [b * max_blocks] long, flattened
    num_seqs: int
    span: int  # max_blocks * block_size (or the exact context when num_seqs == 1)
    keep: torch.Tensor | None  # [b, 1, 1, span] bool, True = attend; None: nothing padded
    first_block: int | None = None  # one row whose blocks are consecutive: read a view, no gather
    members: tuple[int, ...] = ()  # the rows' sequence indices in the step (windows narrow by it)


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Index tensors built once per step and shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] long
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    block_size: int
    # decode rows (one query token each), grouped by context length
    decode_groups: tuple[DecodeGroup, ...]
    num_decode: int
    # prefill group: sequences with several query tokens (prompt chunks)
    prefill_rows: torch.Tensor | None  # [num_prefill_tokens]; None when every row is prefill
    prefill_pad: torch.Tensor | None  # [num_prefill_tokens] rows of [P * max_query]; None: no pad
    prefill_block_tables: torch.Tensor | None  # [P, max_blocks] long; None: causal on fresh K/V
    prefill_mask: torch.Tensor | None  # [P, 1, max_query, max_blocks * block_size] bool
    num_prefill_seqs: int
    max_prefill_query: int
    prefill_qpos: torch.Tensor | None = None  # [P, max_query] long positions (window masks)
    # sliding window -> WindowMasks, built by the first windowed layer of the step, then shared
    windows: dict[int, WindowMasks] = field(default_factory=dict)

    def windowed(self, window: int) -> WindowMasks:
        """This step's masks narrowed to the last `window` positions before each query."""
        masks = self.windows.get(window)
        if masks is None:
            masks = self.windows[window] = WindowMasks.build(self, window)
        return masks

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Group rows into decodes and prefills and build their gather indices and masks."""
        num_tokens = len(slot_mapping)
        starts, start = [], 0
        for q in query_lens:
            starts.append(start)
            start += q
        dec = [i for i, q in enumerate(query_lens) if q == 1]
        pre = [i for i, q in enumerate(query_lens) if q > 1]

        def tables(seqs: list[int]) -> tuple[torch.Tensor, int]:
            nb = max(-(-context_lens[i] // block_size) for i in seqs)
            rows = [(block_tables[i][:nb] + [0] * nb)[:nb] for i in seqs]
            return torch.tensor(rows, dtype=torch.long, device=device), nb * block_size

        def lens(seqs: list[int], which: list[int]) -> torch.Tensor:
            return torch.tensor([which[i] for i in seqs], dtype=torch.long, device=device)

        groups = []
        for members in _group_by_blocks(dec, context_lens, block_size):
            tab, span = tables(members)
            keep = first = None
            if len(members) == 1:
                span = context_lens[members[0]]  # one row: narrow to the exact context, no mask
                used = block_tables[members[0]][: -(-span // block_size)]
                if used == list(range(used[0], used[0] + len(used))):
                    first = used[0]
            elif any(context_lens[i] != span for i in members):
                keys = torch.arange(span, device=device)
                keep = (keys[None, :] < lens(members, context_lens)[:, None]).view(-1, 1, 1, span)
            rows = None
            if len(members) != num_tokens:
                rows = torch.tensor([starts[i] for i in members], dtype=torch.long, device=device)
            group = DecodeGroup(rows, tab.view(-1), len(members), span, keep, first, tuple(members))
            groups.append(group)
        pre_rows = pre_pad = pre_tables = pre_mask = pre_qpos = None
        max_q = max((query_lens[i] for i in pre), default=0)
        if pre:
            if len(dec) > 0:
                pre_rows = torch.tensor(
                    [starts[i] + j for i in pre for j in range(query_lens[i])],
                    dtype=torch.long,
                    device=device,
                )
            if len(pre) > 1:
                pre_pad = torch.tensor(
                    [k * max_q + j for k, i in enumerate(pre) for j in range(query_lens[i])],
                    dtype=torch.long,
                    device=device,
                )
            if len(pre) > 1 or context_lens[pre[0]] != query_lens[pre[0]]:
                pre_tables, span = tables(pre)
                ctx, qlen = lens(pre, context_lens), lens(pre, query_lens)
                # NOTE: padded query rows attend like the last token: no empty rows, no NaN
                j = torch.arange(max_q, device=device)[None, :]
                qpos = torch.minimum(ctx[:, None] - qlen[:, None] + j, ctx[:, None] - 1)
                keys = torch.arange(span, device=device)
                pre_mask = (keys[None, None, :] <= qpos[:, :, None]).unsqueeze(1)
                pre_qpos = qpos
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            query_lens=tuple(query_lens),
            context_lens=tuple(context_lens),
            block_tables=tuple(tuple(t) for t in block_tables),
            block_size=block_size,
            decode_groups=tuple(groups),
            num_decode=len(dec),
            prefill_rows=pre_rows,
            prefill_pad=pre_pad,
            prefill_block_tables=pre_tables,
            prefill_mask=pre_mask,
            num_prefill_seqs=len(pre),
            max_prefill_query=max_q,
            prefill_qpos=pre_qpos,
        )


@dataclass(frozen=True, slots=True)
class WindowMasks:
    """Masks of one sliding window (True = attend): keys older than `window` positions before
    the query drop out. None where the window hides nothing."""

    # per decode group: the group to read (narrowed to the window's blocks where the host knows
    # the lengths) and its mask
    decode: tuple[tuple[DecodeGroup, torch.Tensor | None], ...]
    prefill_mask: torch.Tensor | None  # [P, 1, max_query, span] bool
    causal_mask: torch.Tensor | None  # [T, T] bool: one fresh sequence (no block tables)

    @staticmethod
    def build(meta: AttentionMetadata, window: int) -> WindowMasks:
        """From device tensors only (a CUDA graph's decode metadata has no host lengths)."""
        decode = []
        for g in meta.decode_groups:
            narrowed = _narrow(meta, g, window) if g.members else None
            if narrowed is not None:
                decode.append((narrowed, narrowed.keep))
                continue
            if g.keep is None:  # every row's context is exactly span
                keep = None
                if g.span > window:
                    keys = torch.arange(g.span, device=g.block_tables.device)
                    keep = (keys >= g.span - window).view(1, 1, 1, g.span)
            else:
                ctx = g.keep.sum(-1, keepdim=True)  # [b, 1, 1, 1]
                keys = torch.arange(g.keep.shape[-1], device=g.keep.device)
                keep = g.keep & (keys >= ctx - window)
            decode.append((g, keep))
        pre = causal = None
        if meta.prefill_mask is not None:
            keys = torch.arange(meta.prefill_mask.shape[-1], device=meta.prefill_mask.device)
            band = keys[None, None, :] > meta.prefill_qpos[:, :, None] - window
            pre = meta.prefill_mask & band.unsqueeze(1)
        elif meta.num_prefill_seqs and meta.max_prefill_query > window:
            t = meta.max_prefill_query
            pos = torch.arange(t, device=meta.slot_mapping.device)
            causal = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        return WindowMasks(tuple(decode), pre, causal)


def _narrow(meta: AttentionMetadata, g: DecodeGroup, window: int) -> DecodeGroup | None:
    """The group over only the blocks its window covers (row r from block (ctx_r - W) // bs on),
    or None when that reads no fewer keys. Blocks freed behind the window are never read."""
    bs = meta.block_size
    ctxs = [meta.context_lens[i] for i in g.members]
    firsts = [max(c - window, 0) // bs for c in ctxs]
    nb = max((c - 1) // bs - f + 1 for c, f in zip(ctxs, firsts, strict=True))
    if nb * bs >= g.span:
        return None
    dev = g.block_tables.device
    tables = [
        (list(meta.block_tables[i][f : f + nb]) + [0] * nb)[:nb]
        for i, f in zip(g.members, firsts, strict=True)
    ]
    tab = torch.tensor(tables, dtype=torch.long, device=dev)  # [b, nb]
    start = torch.tensor(firsts, dtype=torch.long, device=dev)[:, None] * bs  # [b, 1]
    ctx = torch.tensor(ctxs, dtype=torch.long, device=dev)[:, None]
    keys = start + torch.arange(nb * bs, device=dev)[None, :]  # [b, nb * bs] positions
    keep = ((keys >= ctx - window) & (keys < ctx)).view(len(ctxs), 1, 1, nb * bs)
    return DecodeGroup(g.rows, tab.view(-1), g.num_seqs, nb * bs, keep, None, g.members)


def _group_by_blocks(seqs: list[int], context_lens: list[int], block_size: int) -> list[list[int]]:
    """Split decode sequences into groups of similar block counts, each in the original order:
    an exact DP over the distinct counts, cost(group) = rows * max blocks + overhead."""
    if len(seqs) <= 1:
        return [seqs] if seqs else []
    blocks = {i: -(-context_lens[i] // block_size) for i in seqs}
    counts: dict[int, int] = {}
    for i in seqs:
        counts[blocks[i]] = counts.get(blocks[i], 0) + 1
    values = sorted(counts)
    if len(values) == 1:
        return [seqs]
    if len(values) > MAX_GROUP_CANDIDATES:  # coarsen: only every k-th value may end a group
        k = -(-len(values) // MAX_GROUP_CANDIDATES)
        ends = values[k - 1 :: k]
        if ends[-1] != values[-1]:
            ends.append(values[-1])
    else:
        ends = values
    below = [0] * len(ends)  # rows with at most ends[j] blocks
    for v, c in counts.items():
        below[bisect.bisect_left(ends, v)] += c
    for j in range(1, len(ends)):
        below[j] += below[j - 1]
    best, cut = [0] * (len(ends) + 1), [0] * (len(ends) + 1)
    for j in range(1, len(ends) + 1):
        options = (
            (best[i] + (below[j - 1] - (below[i - 1] if i else 0)) * ends[j - 1], i)
            for i in range(j)
        )
        cost, cut[j] = min(options)
        best[j] = cost + GROUP_COST_BLOCKS
    bounds, j = [], len(ends)
    while j > 0:
        bounds.append(ends[j - 1])
        j = cut[j]
    bounds.reverse()  # ascending upper block counts of the groups
    groups: list[list[int]] = [[] for _ in bounds]
    for i in seqs:
        groups[bisect.bisect_left(bounds, blocks[i])].append(i)
    return groups


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
    q, k, v, k_cache, v_cache, meta: AttentionMetadata, masks, scale: float, soft_cap
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
    keys = _gather(k_cache, meta.prefill_block_tables).transpose(0, 1).to(q.dtype)  # [P, kv, L, D]
    values = _gather(v_cache, meta.prefill_block_tables).transpose(0, 1).to(q.dtype)
    mask = masks.prefill_mask if masks is not None else meta.prefill_mask
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
