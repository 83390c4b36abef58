"""CUDA graphs for decode steps: one graph per (batch bucket, block bucket), captured on first use
and replayed with the step's ids, positions, slots and block tables copied into static buffers.

A decode step of a small model on a fast GPU is launch-bound (~25 kernels a layer); a replay is
one launch. Rows are padded to the batch bucket (their K/V go to a reserved scratch block) and
context to the block bucket (masked), so a graph serves every step of its shape.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from model.inputs import StepInput
from model.layers.attention import AttentionMetadata, DecodeGroup

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_BLOCKS = 4  # block buckets are powers of two from here up to max_model_len's blocks
MAX_GATHERED_TOKENS = 1 << 20  # a bucket whose K/V gather exceeds this (per layer) runs eagerly


def bucket(n: int, sizes: tuple[int, ...] | list[int]) -> int | None:
    """The smallest size >= n, or None when n exceeds them all."""
    return next((s for s in sizes if s >= n), None)


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor  # [batch bucket, hidden] the replay's output, static


class CUDAGraphs:
    """Decode graphs of one model rank; `run` returns None for a step they do not serve."""

    def __init__(self, model: nn.Module, block_size: int, max_model_len: int, pad_block: int):
        self.model = model
        self.block_size = block_size
        self.pad_block = pad_block  # a KV block no sequence owns: padded rows write there
        max_blocks = -(-max_model_len // block_size)
        self.block_sizes = [MIN_BLOCKS]
        while self.block_sizes[-1] < max_blocks:
            self.block_sizes.append(self.block_sizes[-1] * 2)
        self.block_sizes[-1] = max(max_blocks, MIN_BLOCKS)
        dev = next(model.parameters()).device
        b, nb = BATCH_SIZES[-1], self.block_sizes[-1]
        self.input_ids = torch.zeros(b, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, dtype=torch.long, device=dev)
        self.slots = torch.zeros(b, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(b, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(b, nb, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None  # one memory pool all graphs share (they never run at once)

    def shape(self, step: StepInput) -> tuple[int, int] | None:
        """(batch bucket, block bucket) of a pure-decode step, or None: the eager path takes it."""
        if not step.query_lens or any(q != 1 for q in step.query_lens):
            return None
        b = bucket(step.num_seqs, BATCH_SIZES)
        nb = bucket(-(-max(step.context_lens) // self.block_size), self.block_sizes)
        if b is None or nb is None or b * nb * self.block_size > MAX_GATHERED_TOKENS:
            return None
        return b, nb

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor | None:
        """[num_seqs, hidden] final-normed hidden states of a decode step, or None (not served)."""
        shape = self.shape(step)
        if shape is None:
            return None
        self.load(step, *shape)
        entry = self.graphs.get(shape)
        if entry is None:
            entry = self.graphs[shape] = self._capture(*shape)
        entry.graph.replay()
        return entry.hidden[: step.num_seqs]

    def load(self, step: StepInput, b: int, nb: int) -> None:
        """Copy the step into the static buffers; rows past it decode token 0 into pad_block."""
        n, bs, pad = step.num_seqs, self.block_size, self.pad_block
        used = [t[:nb] for t in step.block_tables]
        width = max(len(t) for t in used)  # the real blocks; the rest of each row is pad_block
        tables = torch.tensor([t + [pad] * (width - len(t)) for t in used], dtype=torch.long)
        rows = torch.tensor(
            [
                step.input_ids + [0] * (b - n),
                step.positions + [0] * (b - n),
                step.slot_mapping + [pad * bs] * (b - n),
                step.context_lens + [1] * (b - n),
            ],
            dtype=torch.long,
        )  # [4, b]
        rows = self._pinned(rows)
        self.input_ids[:b].copy_(rows[0], non_blocking=True)
        self.positions[:b].copy_(rows[1], non_blocking=True)
        self.slots[:b].copy_(rows[2], non_blocking=True)
        self.context_lens[:b].copy_(rows[3], non_blocking=True)
        self.block_tables[:b, :nb].fill_(pad)
        self.block_tables[:n, :width].copy_(self._pinned(tables), non_blocking=True)

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        """Page-locked for a GPU model, so that the copy to it is asynchronous; as is on CPU."""
        return t.pin_memory() if self.slots.is_cuda else t

    def forward(self, b: int, nb: int) -> torch.Tensor:
        """The model on the static buffers ([b, hidden]): metadata built from them by device ops
        only, so that a capture records it too. Eager on CPU: the padding's own test."""
        span = nb * self.block_size
        keep = torch.arange(span, device=self.slots.device)[None, :] < self.context_lens[:b, None]
        group = DecodeGroup(
            rows=None,
            block_tables=self.block_tables[:b, :nb].reshape(-1),
            num_seqs=b,
            span=span,
            keep=keep.view(b, 1, 1, span),
        )
        meta = AttentionMetadata(  # NOTE: the host-side fields are unused by the sdpa decode path
            slot_mapping=self.slots[:b],
            query_lens=(1,) * b,
            context_lens=(),
            block_tables=(),
            block_size=self.block_size,
            decode_groups=(group,),
            num_decode=b,
            prefill_rows=None,
            prefill_pad=None,
            prefill_block_tables=None,
            prefill_mask=None,
            num_prefill_seqs=0,
            max_prefill_query=0,
        )
        return self.model(self.input_ids[:b], self.positions[:b], meta)

    def _capture(self, b: int, nb: int) -> _Graph:
        """Warm up on a side stream (it computes this step's K/V too: the replay rewrites the same
        values), then capture into the shared pool."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward(b, nb)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.forward(b, nb)
        logger.info("captured a CUDA graph for %d rows x %d blocks in %.3f s", b, nb,
                    time.perf_counter() - t0)  # fmt: skip
        return _Graph(graph, hidden)
