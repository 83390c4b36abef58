"""Paged KV cache: fixed-size blocks preallocated once per layer; bytes <-> blocks <-> tokens."""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

CPU_DEFAULT_TOKENS = 32768  # twice llama-server's reference 16 x 1024 context: room for 64 streams
CPU_RAM_FRACTION = 0.25  # of the RAM available when the cache is sized
GPU_MEMORY_FRACTION = 0.9  # of the free memory left after the weights


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape of one layer's cache and how many bytes one block costs across all layers."""

    num_layers: int
    num_kv_heads: int  # per TP rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block

    def capacity_tokens(self, num_blocks: int) -> int:
        return num_blocks * self.block_size


def available_cpu_memory() -> int:
    """MemAvailable from /proc/meminfo, else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_cache_memory(
    device: torch.device, spec: KVCacheSpec, max_model_len: int | None = None
) -> int:
    """CUDA: 90% of the free memory after weights. CPU: what this model needs for
    max(32k tokens, max_model_len) of context, capped at a quarter of the available RAM; pages
    are touched only as blocks are used (allocate_kv_cache), so an idle cache costs no RSS."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_FRACTION)
    tokens = max(CPU_DEFAULT_TOKENS, max_model_len or 0)
    want = -(-tokens // spec.block_size) * spec.bytes_per_block
    return int(min(want, available_cpu_memory() * CPU_RAM_FRACTION))


def allocate_kv_cache(
    spec: KVCacheSpec, num_blocks: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (K, V) per layer, each [num_kv_heads, num_blocks, block_size, head_dim] (heads
    outermost: a batch's gathered blocks need no transpose).

    NOTE: zeros, not empty: masked slots get probability 0, and 0 * NaN (garbage) = NaN. On CPU
    each tensor is its own anonymous mmap: zero pages that become resident only when a block is
    first written, and page-aligned, so one (head, block) of 4 KiB is one page, not two (calloc's
    16-byte header made every block straddle a page border and doubled the KV cache's RSS).
    """
    shape = (spec.num_kv_heads, num_blocks, spec.block_size, spec.head_dim)

    def zeros() -> torch.Tensor:
        if device.type != "cpu":
            return torch.zeros(shape, dtype=spec.dtype, device=device)
        elem = torch.empty((), dtype=spec.dtype).element_size()
        nbytes = elem * int(np.prod(shape))
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = torch.frombuffer(mm, dtype=torch.uint8)
        return raw.view(spec.dtype).view(shape)

    return [(zeros(), zeros()) for _ in range(spec.num_layers)]
