"""Attention metadata: what one step's paged attention reads, built once and shared by every
layer: decode groups of similar context length, the prefill padding and masks, and the masks (and
narrowed block tables) of each sliding window."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

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
    prefill_members: tuple[int, ...] = ()  # the prefill rows' sequence indices in the step
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
        rows = _StepRows.of(query_lens, context_lens, block_tables, block_size, device)
        dec = [i for i, q in enumerate(query_lens) if q == 1]
        pre = [i for i, q in enumerate(query_lens) if q > 1]
        groups = [
            rows.decode_group(members, len(slot_mapping))
            for members in _group_by_blocks(dec, context_lens, block_size)
        ]
        max_q = max((query_lens[i] for i in pre), default=0)
        pre_rows, pre_pad, pre_tables, pre_mask, pre_qpos = rows.prefill(pre, len(dec) > 0, max_q)
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
            prefill_members=tuple(pre),
        )


@dataclass(frozen=True, slots=True)
class _StepRows:
    """The step's host lists, from which AttentionMetadata.build makes its device indices."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    device: torch.device | str
    starts: list[int]  # each sequence's first token row

    @staticmethod
    def of(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> _StepRows:
        starts, start = [], 0
        for q in query_lens:
            starts.append(start)
            start += q
        return _StepRows(query_lens, context_lens, block_tables, block_size, device, starts)

    def tables(self, seqs: list[int]) -> tuple[torch.Tensor, int]:
        """[len(seqs), max_blocks] block tables (short ones padded with block 0) and their span."""
        nb = max(-(-self.context_lens[i] // self.block_size) for i in seqs)
        rows = [(self.block_tables[i][:nb] + [0] * nb)[:nb] for i in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device), nb * self.block_size

    def lens(self, seqs: list[int], which: list[int]) -> torch.Tensor:
        return torch.tensor([which[i] for i in seqs], dtype=torch.long, device=self.device)

    def decode_group(self, members: list[int], num_tokens: int) -> DecodeGroup:
        """One group's tables, padded to its longest context and masked where a row is shorter."""
        context_lens, block_size, device = self.context_lens, self.block_size, self.device
        tab, span = self.tables(members)
        keep = first = None
        if len(members) == 1:
            span = context_lens[members[0]]  # one row: narrow to the exact context, no mask
            used = self.block_tables[members[0]][: -(-span // block_size)]
            if used == list(range(used[0], used[0] + len(used))):
                first = used[0]
        elif any(context_lens[i] != span for i in members):
            keys = torch.arange(span, device=device)
            keep = (keys[None, :] < self.lens(members, context_lens)[:, None]).view(-1, 1, 1, span)
        rows = None
        if len(members) != num_tokens:
            rows = torch.tensor([self.starts[i] for i in members], dtype=torch.long, device=device)
        return DecodeGroup(rows, tab.view(-1), len(members), span, keep, first, tuple(members))

    def prefill(
        self, pre: list[int], has_decode: bool, max_q: int
    ) -> tuple[torch.Tensor | None, ...]:
        """(rows, pad, block tables, mask, query positions) of the prompt chunks; None where not
        needed (no decode rows to skip, one chunk to pad, a fresh prompt's plain causal mask)."""
        query_lens, context_lens = self.query_lens, self.context_lens
        starts, device = self.starts, self.device
        pre_rows = pre_pad = pre_tables = pre_mask = pre_qpos = None
        if not pre:
            return pre_rows, pre_pad, pre_tables, pre_mask, pre_qpos
        if has_decode:
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
            pre_tables, span = self.tables(pre)
            ctx, qlen = self.lens(pre, context_lens), self.lens(pre, query_lens)
            # NOTE: padded query rows attend like the last token: no empty rows, no NaN
            j = torch.arange(max_q, device=device)[None, :]
            qpos = torch.minimum(ctx[:, None] - qlen[:, None] + j, ctx[:, None] - 1)
            keys = torch.arange(span, device=device)
            pre_mask = (keys[None, None, :] <= qpos[:, :, None]).unsqueeze(1)
            pre_qpos = qpos
        return pre_rows, pre_pad, pre_tables, pre_mask, pre_qpos


@dataclass(frozen=True, slots=True)
class WindowMasks:
    """Masks of one sliding window (True = attend): keys older than `window` positions before
    the query drop out. None where the window hides nothing."""

    # per decode group: the group to read (narrowed to the window's blocks where the host knows
    # the lengths) and its mask
    decode: tuple[tuple[DecodeGroup, torch.Tensor | None], ...]
    prefill_mask: torch.Tensor | None  # [P, 1, max_query, span] bool
    prefill_tables: torch.Tensor | None  # [P, blocks] long: narrowed to the window; None: meta's
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
        pre = pre_tables = causal = None
        if meta.prefill_mask is not None:
            narrowed = _narrow_prefill(meta, window) if meta.prefill_members else None
            if narrowed is not None:
                pre_tables, pre = narrowed
            else:
                keys = torch.arange(meta.prefill_mask.shape[-1], device=meta.prefill_mask.device)
                band = keys[None, None, :] > meta.prefill_qpos[:, :, None] - window
                pre = meta.prefill_mask & band.unsqueeze(1)
        elif meta.num_prefill_seqs and meta.max_prefill_query > window:
            t = meta.max_prefill_query
            pos = torch.arange(t, device=meta.slot_mapping.device)
            causal = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        return WindowMasks(tuple(decode), pre, pre_tables, causal)


def _narrow_prefill(meta: AttentionMetadata, window: int) -> tuple[torch.Tensor, ...] | None:
    """(tables, mask) of the prompt chunks over only the blocks their windows cover (a chunk
    from position s sees s - W + 1 on), or None when that reads no fewer keys."""
    bs, members = meta.block_size, meta.prefill_members
    ctxs = [meta.context_lens[i] for i in members]
    firsts = [
        max(c - meta.query_lens[i] - window + 1, 0) // bs
        for i, c in zip(members, ctxs, strict=True)
    ]
    nb = max((c - 1) // bs - f + 1 for c, f in zip(ctxs, firsts, strict=True))
    if nb >= meta.prefill_block_tables.shape[1]:
        return None
    dev = meta.prefill_block_tables.device
    tables = [
        (list(meta.block_tables[i][f : f + nb]) + [0] * nb)[:nb]
        for i, f in zip(members, firsts, strict=True)
    ]
    tab = torch.tensor(tables, dtype=torch.long, device=dev)  # [P, nb]
    start = torch.tensor(firsts, dtype=torch.long, device=dev)[:, None, None] * bs
    keys = start + torch.arange(nb * bs, device=dev)  # [P, 1, nb * bs] positions
    qpos = meta.prefill_qpos[:, :, None]  # [P, max_query, 1]
    return tab, ((keys <= qpos) & (keys > qpos - window)).unsqueeze(1)


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
