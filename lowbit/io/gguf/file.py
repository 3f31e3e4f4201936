"""Parse a GGUF file's header: metadata (key -> value) and tensor table (name, type id, shape, offset).

    f = parse_gguf("model.gguf"); f.meta["llama.block_count"]; f.tensors["token_embd.weight"].shape

Our own parser because gguf-py's GGUFReader takes seconds per file on a 49k-token vocabulary (it builds
a numpy view per string). Every read is bounds-checked: a truncated or corrupt file gives a ValueError
naming the file and what was being read, never an error from inside numpy or struct.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
# GGUF value types: id -> struct code (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
       7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    shape: tuple[int, ...]  # PyTorch order: slowest dimension first ([out, in] for weights)
    offset: int  # from the start of the file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    meta: dict
    types: dict  # key -> GGUF value type id (arrays: (9, item type))
    tensors: dict[str, TensorInfo]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"{self.path} is truncated or corrupt: {what} runs past the end of the file "
                             f"(byte {self.pos} + {n} of {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, code: str, what: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("Q", what), what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: {what} is not UTF-8 ({e})") from e

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            item, n = self.scalar("I", what), self.scalar("Q", what)
            if item in _NP:
                size = np.dtype(_NP[item]).itemsize
                return np.frombuffer(self.take(n * size, what), dtype=_NP[item]).tolist()
            if item == STRING:
                return [self.string(what) for _ in range(n)]
            raise ValueError(f"{self.path}: {what} is an array of unsupported value type {item}")
        raise ValueError(f"{self.path}: {what} has unknown value type {vtype} (corrupt file?)")


def parse_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    c = _Cursor(memoryview(data), path)
    if bytes(c.take(4, "the magic number") if len(data) >= 4 else b"") != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    version = c.scalar("I", "the version")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.scalar("Q", "the tensor count"), c.scalar("Q", "the metadata count")
    meta, types = {}, {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        vtype = c.scalar("I", f"the type of {key!r}")
        pos = c.pos
        meta[key] = c.value(vtype, f"metadata {key!r}")
        types[key] = (vtype, struct.unpack_from("<I", c.buf, pos)[0]) if vtype == ARRAY else vtype
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        ndim = c.scalar("I", f"tensor {name!r}")
        if not 1 <= ndim <= 4:
            raise ValueError(f"{path}: tensor {name!r} has {ndim} dimensions (corrupt file?)")
        dims = [c.scalar("Q", f"tensor {name!r}") for _ in range(ndim)]
        type_id, offset = c.scalar("I", f"tensor {name!r}"), c.scalar("Q", f"tensor {name!r}")
        infos.append((name, type_id, tuple(reversed(dims)), offset))
    align = _alignment(path, meta.get("general.alignment", 32))
    start = -(-c.pos // align) * align
    tensors = {n: TensorInfo(n, t, s, start + o) for n, t, s, o in infos}
    if len(tensors) != len(infos):
        raise ValueError(f"{path}: a tensor name appears twice (corrupt file?)")
    _check_data_ranges(path, tensors.values(), len(data))
    return GGUFFile(path, version, meta, types, tensors)


def type_sizes(type_id: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) of GGML type `type_id`: lowbit's own table, else gguf-py's
    (when installed); None when neither knows the type."""
    from ...core.ggml_blocks import type_by_id

    t = type_by_id(type_id)
    if t is not None:
        return t.block_size, t.type_size
    try:
        import gguf
        return tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)])
    except (ImportError, ValueError, KeyError):
        return None


def data_nbytes(info: TensorInfo) -> int | None:
    """Bytes of one tensor's data in the file, from its shape and type (None: a type no table knows)."""
    sizes = type_sizes(info.type_id)
    if sizes is None:
        return None
    block, size = sizes
    return int(np.prod(info.shape, dtype=object)) // block * size


def _check_data_ranges(path: Path, tensors, file_size: int) -> None:
    """Every tensor's data lies inside the file: a file cut short (an interrupted download or copy)
    is refused here, by name, before anything reads a tensor."""
    for info in tensors:
        n = data_nbytes(info)
        end = info.offset + (n or 0)
        if end > file_size:
            raise ValueError(f"{path} is truncated: tensor {info.name!r} needs bytes {info.offset}..{end} "
                             f"but the file has {file_size} (an interrupted download or copy?)")


def _alignment(path: Path, align) -> int:
    """general.alignment, checked as llama.cpp's gguf.cpp checks it: a power of two (0 would divide
    by zero, 3 would misplace every tensor)."""
    if not (isinstance(align, int) and not isinstance(align, bool) and 0 < align < 2**32 and align & (align - 1) == 0):
        raise ValueError(f"{path}: metadata general.alignment is {align!r:.40}; GGUF needs a uint32 power "
                         "of two (32 by default)")
    return align


def tensor_nbytes(f: GGUFFile, info: TensorInfo, block_size: int, type_size: int) -> int:
    """Bytes of one tensor's blocks, checked: whole blocks per row, and inside the file."""
    n = info.shape[-1]
    if n % block_size:
        raise ValueError(f"{f.path}: tensor {info.name!r} has rows of {n} values, not a multiple of its "
                         f"type's {block_size}-value blocks")
    nbytes = math.prod(info.shape[:-1]) * (n // block_size) * type_size  # Python ints: no overflow
    size = f.path.stat().st_size
    if info.offset + nbytes > size:
        raise ValueError(f"{f.path} is truncated: tensor {info.name!r} needs bytes {info.offset}..{info.offset + nbytes}"
                         f" but the file has {size}")
    return nbytes


def tensor_bytes(f: GGUFFile, info: TensorInfo, block_size: int, type_size: int) -> np.ndarray:
    """The raw blocks of one tensor as a read-only uint8 array [rows, bytes per row] (memory-mapped)."""
    nbytes = tensor_nbytes(f, info, block_size, type_size)
    data = np.memmap(f.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(nbytes,))
    return data.reshape(math.prod(info.shape[:-1]), -1)
