"""GGUF header parser: gguf-py's GGUFReader takes ~5 s on a 49k vocabulary, this ~0.1 s.

Tensors are gguf-py's own `ReaderTensor`s (so `gguf.quants` reads them unchanged), metadata plain
Python values. Little-endian files only, as llama.cpp writes them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_ITEMS = 1 << 22  # per metadata array (a vocabulary: ~10^5); a Python list of it is big
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...
MIN_KV_BYTES = 13  # key length (8) + value type (4) + the smallest value (1)
MIN_TENSOR_INFO_BYTES = 24  # name length (8) + n_dims (4) + type (4) + offset (8)
# GGUFValueType → struct format of its scalars (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
            10: "Q", 11: "q", 12: "d"}  # fmt: skip
# tensor types gguf-py hands out as typed elements; every other type is raw bytes (uint8)
_TYPED = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64,
          28: np.float64}  # fmt: skip


@dataclass(slots=True)
class GGUFFile:
    """The parsed header of a memory-mapped GGUF: metadata values and tensor views."""

    data: np.memmap  # the whole file
    fields: dict[str, Any]
    tensors: list[Any]  # gguf.ReaderTensor, in file order


class _Cursor:
    """Reads little-endian values from a buffer; running past its end raises ValueError."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            raise ValueError(f"header ends at byte {self.pos}: {e}") from e
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"string of {n} bytes at byte {self.pos} runs past the file end")
        s = str(self.buf[self.pos : self.pos + n], "utf-8")
        self.pos += n
        return s

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == 8:
            return self.string()
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype != 9:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        if depth >= MAX_ARRAY_DEPTH:
            raise ValueError(f"arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {self.pos}")
        itype, n = self.take("I"), self.take("Q")
        if n > MAX_ARRAY_ITEMS:
            raise ValueError(f"array of {n} items at byte {self.pos} > {MAX_ARRAY_ITEMS}")
        if itype in _SCALARS:  # one numpy read, not n struct calls
            dtype = np.dtype("<" + _SCALARS[itype])
            if self.pos + n * dtype.itemsize > len(self.buf):
                raise ValueError(f"array of {n} values at byte {self.pos} runs past the file end")
            out = np.frombuffer(self.buf, dtype, n, self.pos).tolist()
            self.pos += n * dtype.itemsize
            return out
        if n > (len(self.buf) - self.pos) // 8:  # a string or an array takes at least 8 bytes
            raise ValueError(f"array of {n} items at byte {self.pos} runs past the file end")
        return [self.value(itype, depth + 1) for _ in range(n)]


def read_gguf(path: str) -> GGUFFile:
    """Parse the header of `path`; ValueError on anything malformed (the caller names the file)."""
    import gguf

    data = np.memmap(path, mode="r")
    cur = _Cursor(memoryview(data))
    if cur.take("I") != 0x46554747:  # b"GGUF"
        raise ValueError(f"not a GGUF file (bad magic {bytes(data[:4])!r})")
    version = cur.take("I")
    if version not in GGUF_VERSIONS:
        raise ValueError(f"GGUF version {version} (big-endian or unknown): reads {GGUF_VERSIONS}")
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    # NOTE: counts are checked against the file's size before a loop runs on them
    least = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
    if cur.pos + least > len(data):
        raise ValueError(f"{n_kv} metadata keys and {n_tensors} tensors need at least "
                         f"{cur.pos + least} bytes: the file has {len(data)}")  # fmt: skip
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        if key in fields:
            raise ValueError(f"duplicate metadata key {key}")
        fields[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        if n_dims > MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions > {MAX_DIMS}")
        dims = [cur.take("Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.take("I"), cur.take("Q")))
    align = fields.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise ValueError(f"general.alignment {align!r} is not a power of two")
    start = -(-cur.pos // align) * align
    tensors, seen = [], set()
    for name, dims, raw_type, offset in infos:
        if name in seen:
            raise ValueError(f"duplicate tensor {name}")
        seen.add(name)
        qtype = gguf.GGMLQuantizationType(raw_type)
        if qtype not in gguf.GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name} has type {qtype.name} of no known block size")
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = math.prod(dims)  # NOTE: Python ints: no uint64 wrap-around
        if n_elems % block or (dims and dims[0] % block):
            raise ValueError(f"tensor {name} of {dims} elements is not whole {qtype.name} blocks")
        n_bytes = n_elems * size // block
        shape = tuple(reversed(dims))  # torch order: slowest dimension first
        if raw_type in _TYPED:
            item, count = _TYPED[raw_type], n_elems
        else:
            item, count = np.uint8, n_bytes
            shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        begin = start + offset
        if begin + n_bytes > len(data):
            raise ValueError(f"tensor {name} needs bytes up to {begin + n_bytes}")
        view = data[begin : begin + n_bytes].view(item)[:count].reshape(shape)
        tensors.append(
            gguf.ReaderTensor(
                name, qtype, np.array(dims, dtype=np.uint64), n_elems, n_bytes, begin, view, None
            )  # fmt: skip
        )
    return GGUFFile(data, fields, tensors)
