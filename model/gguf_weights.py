"""GGUF file → (hf_name, tensor) stream plus an HF-style config dict: the GGUF adapter.

The config comes from the header (model/gguf_config.py); this file names, reads and loads tensors.

Quantized 2-D tensors stay packed (GGUFQuantTensor): a rank's loader narrows one to its rows or
columns and only those raw blocks are converted. Float tensors, and everything under quantization
"none" (the reference path), are dequantized whole, then narrowed.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.gguf_config import build_config
from model.gguf_reader import GGUFFile, read_gguf
from model.layers.qdot import GGML_TYPE_IDS, BlockTensor, permute_block_rows
from model.layers.quant import PACKED_TYPES, QuantTensor, from_gguf_blocks, permute_rows

logger = logging.getLogger(__name__)

PERMUTED_QK = ("llama", "smollm3", "granite")  # the converter's LlamaModel.permute: undone here
NORM_PLUS_ONE = ("gemma2", "gemma3")  # the converter stores Gemma's (1 + w): w is given back

# Q2_K / Q3_K: llama-quantize's Q2_K and Q3_K_S/M/L mixes (both paths, like the other K-quants)
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the router
    "ffn_gate_exps": "mlp.experts.gate_proj",  # [E, inter, hidden], every expert stacked
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# per architecture: the names whose meaning differs from _PER_LAYER's
_PER_LAYER_ARCH = {
    "gemma2": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused
}
_PER_LAYER_ARCH["gemma3"] = _PER_LAYER_ARCH["gemma2"]
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# older Mixtral files: one tensor per expert (blk.N.ffn_gate.E.weight), not stacked
_EXPERT_NAME = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# Tensors that configure the model instead of holding weights (gguf_config.py reads them).
_CONFIG_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' → 'model.layers.3.self_attn.q_proj.weight'; None when unknown."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _EXPERT_NAME.match(name)
    if m is not None:
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    m = _LAYER_NAME.match(name)
    if m is None:
        return None
    hf = _PER_LAYER_ARCH.get(arch, {}).get(m.group(2)) or _PER_LAYER.get(m.group(2))
    return None if hf is None else f"model.layers.{m.group(1)}.{hf}.{m.group(3)}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` (rotary pairs interleaved → HF's halves)."""
    # w: [n_head * head_dim, ...] stored as [n_head, head_dim // 2, 2, ...]
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def _read(path: str) -> GGUFFile:
    """Parse the header; any parse failure becomes a ValueError that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return read_gguf(path)
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError) as e:
        size = os.path.getsize(path)
        raise ValueError(f"corrupt or truncated GGUF file {path} ({size} bytes): {e}") from e


class GGUFQuantTensor(QuantTensor):
    """A packed GGUF weight read on demand: narrow_rows / narrow_cols convert only a rank's raw
    blocks, anything else the whole tensor once. `heads`: llama Q/K rows are permuted per head,
    so a slice of whole heads is un-permuted on its own."""

    __slots__ = ("kind", "raw", "rows", "cols", "heads", "_whole")

    def __init__(self, kind: str, raw: np.ndarray, rows: int, cols: int, heads: int | None):
        self.kind, self.raw, self.rows, self.cols, self.heads = kind, raw, rows, cols, heads
        self._whole: QuantTensor | None = None

    def _convert(self, raw: np.ndarray, rows: int, cols: int) -> QuantTensor:
        out = from_gguf_blocks(self.kind, raw, rows, cols)
        if self.heads is not None:
            heads = self.heads * rows // self.rows
            out = permute_rows(out, lambda r, h=heads: unpermute_qk(r, h))
        return QuantTensor(out.fmt, out.qweight, out.scales, out.mins)

    def whole(self) -> QuantTensor:
        if self._whole is None:
            self._whole = self._convert(self.raw, self.rows, self.cols)
        return self._whole

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __getattr__(self, name: str) -> Any:
        """fmt, qweight, scales, mins (this subclass leaves those slots unset): the whole one's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.whole(), name)

    def narrow_rows(self, start: int, length: int) -> QuantTensor:
        """Rows [start, start + length), converted from those rows' raw blocks alone."""
        head_rows = self.rows // self.heads if self.heads else 1
        if start % head_rows or length % head_rows:
            return self.whole().narrow_rows(start, length)
        return self._convert(self.raw[start : start + length], length, self.cols)

    def narrow_cols(self, start: int, length: int) -> QuantTensor | None:
        """Columns [start, start + length): whole GGUF blocks are sliced raw, else converted."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.kind]]
        if start % block or length % block:
            return self.whole().narrow_cols(start, length)
        raw = self.raw[:, start // block * size : (start + length) // block * size]
        return self._convert(raw, self.rows, length)

    def dequantize(self) -> torch.Tensor:
        return self.whole().dequantize()


class GGUFExperts:
    """A stacked [E, rows, cols] quantized expert tensor (ffn_*_exps), read one expert at a time
    from its own bytes: never unstacked or dequantized whole (model/layers/experts.py)."""

    __slots__ = ("kind", "raw", "rows", "cols", "blocks")

    def __init__(self, kind: str, raw: np.ndarray, rows: int, cols: int, blocks: bool) -> None:
        self.kind, self.raw, self.rows, self.cols, self.blocks = kind, raw, rows, cols, blocks

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.raw.shape[0], self.rows, self.cols

    def expert(self, e: int) -> QuantTensor:
        """Expert e: the file's blocks (int8 path) or a lazily converted packed tensor."""
        if self.blocks and self.kind in GGML_TYPE_IDS:
            data = torch.from_numpy(np.array(self.raw[e], dtype=np.uint8, copy=True))
            return BlockTensor([(self.kind, data)], self.cols)
        return GGUFQuantTensor(self.kind, self.raw[e], self.rows, self.cols, None)


@dataclass(slots=True)
class GGUFCheckpoint:
    """A memory-mapped GGUF: HF-style config plus tensors read and dequantized on demand."""

    path: str
    config: dict[str, Any]
    reader: Any = field(repr=False)
    _by_hf_name: dict[str, Any] = field(repr=False)  # hf name → gguf ReaderTensor

    def tensor_names(self) -> list[str]:
        """HF names of every weight tensor, in file order."""
        return list(self._by_hf_name)

    def has_blocks(self) -> bool:
        """Whether a matrix is in quantized blocks the int8 kernels take (an F16/F32 file has
        none: its weights are float, and `--activation-dtype auto` keeps it exact)."""
        return any(
            t.tensor_type.name in GGML_TYPE_IDS and len(t.shape) == 2
            for t in self._by_hf_name.values()
        )

    def get(
        self, name: str, packed: bool = False, blocks: bool = False
    ) -> torch.Tensor | QuantTensor:
        """One tensor by HF name, (llama Q/K) un-permuted: dequantized to float32, or with
        packed=True a quantized tensor kept in its packed layout (model/layers/quant.py), or with
        blocks=True too, where qdot.c takes its type, in the file's own blocks (int8 path)."""
        import gguf

        t = self._by_hf_name.get(name)
        if t is None:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        kind = t.tensor_type.name
        heads = None
        arch = self.reader.fields.get("general.architecture")
        if packed and kind in PACKED_TYPES and len(t.shape) == 3:
            cols, rows, experts = (int(n) for n in t.shape)
            return GGUFExperts(kind, t.data.reshape(experts, rows, -1), rows, cols, blocks)
        if arch in PERMUTED_QK:
            if ".self_attn.q_proj." in name:
                heads = self.config["num_attention_heads"]
            elif ".self_attn.k_proj." in name:
                heads = self.config["num_key_value_heads"]
        if packed and blocks and kind in GGML_TYPE_IDS and len(t.shape) == 2:
            cols, rows = (int(n) for n in t.shape)  # GGUF lists the fastest dimension first
            data = torch.from_numpy(np.array(t.data.reshape(rows, -1), dtype=np.uint8, copy=True))
            out = BlockTensor([(kind, data)], cols)
            if heads is None:
                return out
            return permute_block_rows(out, lambda r: unpermute_qk(r, heads))
        if packed and kind in PACKED_TYPES and len(t.shape) == 2:
            cols, rows = (int(n) for n in t.shape)
            return GGUFQuantTensor(kind, t.data.reshape(rows, -1), rows, cols, heads)
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # [rows, cols] torch order
        out = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            out -= 1.0
        return unpermute_qk(out, heads) if heads is not None else out

    def tensors(
        self, packed: bool = False, blocks: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
        """Yield (hf_name, tensor) one at a time (packed: quantized types stay packed; blocks: in
        the file's blocks where the int8 kernels take them); a tied model has no lm_head.weight."""
        for name in self._by_hf_name:
            yield name, self.get(name, packed, blocks)
            _release_pages(self.reader, self._by_hf_name[name])  # the consumer has converted it


def _release_pages(reader: Any, t: Any) -> None:
    """Drop a converted tensor's file pages from this process's RSS (they stay in the page
    cache): the packed or float copy is what stays resident, not the mapping beside it."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(int(t.data_offset) + int(t.n_bytes), len(mm))
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _check_shapes(config: dict[str, Any], by_hf: dict[str, Any], path: str) -> None:
    """Every size the header declares is a tensor the file holds, before a model is allocated
    from them: token_embd is [vocab, hidden], block_count layers are there, each of the shapes
    its heads and FFN width say."""
    c = config
    hidden, vocab, inter = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    want = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,)}  # fmt: skip
    per_layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter),
    }  # fmt: skip
    if "model.embed_tokens.weight" not in by_hf:
        raise ValueError(f"GGUF file {path} has no token_embd.weight")
    layers = set()
    for name, t in by_hf.items():
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest dim first
        if name.startswith("model.layers."):
            index, _, role = name.removeprefix("model.layers.").partition(".")
            layers.add(int(index))
            expected = per_layer.get(role)
        else:
            expected = want.get(name)
        if expected is not None and shape != expected:
            raise ValueError(f"GGUF file {path}: tensor {name} is {list(shape)}, its header "
                             f"says {list(expected)}")  # fmt: skip
    n = c["num_hidden_layers"]
    if layers != set(range(n)):
        raise ValueError(f"GGUF file {path}: block_count {n}, but it holds tensors of "
                         f"{len(layers)} layers")  # fmt: skip


def load_gguf(path: str) -> GGUFCheckpoint:
    """open_gguf, then check that every size its header declares matches the tensors it holds
    (a model is allocated from those sizes). Raises as open_gguf does, and ValueError naming
    the size and tensor that disagree."""
    ckpt = open_gguf(path)
    _check_shapes(ckpt.config, ckpt._by_hf_name, ckpt.path)
    return ckpt


def open_gguf(path: str) -> GGUFCheckpoint:
    """Open a GGUF file: validate its header, map tensor names, build the HF-style config.

    Raises FileNotFoundError for a missing file and ValueError (naming the file) for a corrupt or
    truncated file, an unsupported architecture, quantization type, or unknown tensor.
    """
    path = os.fspath(path)
    reader = _read(path)
    raw = {t.name: t for t in reader.tensors}
    config = build_config(reader, path, raw)
    # NOTE: the tokenizer reads the file itself: its arrays (49k strings, merges: ~20 MB) go
    for key in [
        k for k, v in reader.fields.items() if k.startswith("tokenizer.ggml.") and type(v) is list
    ]:
        del reader.fields[key]
    by_hf: dict[str, Any] = {}
    for name, t in raw.items():
        if name in _CONFIG_TENSORS:
            continue
        hf_name = gguf_to_hf_name(name, reader.fields.get("general.architecture"))
        if hf_name is None:
            raise ValueError(f"unknown tensor {name!r} in GGUF file {path}")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"tensor {name} in {path} has unsupported type {t.tensor_type.name}: "
                f"supported {', '.join(SUPPORTED_TYPES)}"
            )
        by_hf[hf_name] = t
    logger.info(
        "GGUF %s: %s, %d tensors, %d layers",
        os.path.basename(path),
        config["architectures"][0],
        len(by_hf),
        config["num_hidden_layers"],
    )
    return GGUFCheckpoint(path=path, config=config, reader=reader, _by_hf_name=by_hf)
