"""Read a block of rows of one tensor from a safetensors file, and nothing else.

A safetensors file is 8 bytes (little-endian header length), a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} and the tensors' bytes, row-major. Rows [a, b) of a tensor are one
contiguous byte range, read here with a plain file read into a fresh buffer: unlike a memory map,
no page of the file stays counted in the process's resident memory after the read, so quantizing
a 2 GB table a block of rows at a time holds one block (io/streaming/).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""
    path: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of its first byte

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the tensor: [stop - start, *shape[1:]] in its stored dtype."""
        if not (self.shape and 0 <= start <= stop <= self.shape[0]):
            raise ValueError(f"{self.path}: tensor {self.name!r} of shape {list(self.shape)}: rows {start}:{stop} asked")
        row = self.dtype.itemsize * math.prod(self.shape[1:])
        buf = bytearray((stop - start) * row)
        with open(self.path, "rb") as f:
            f.seek(self.begin + start * row)
            got = f.readinto(memoryview(buf))
        if got != len(buf):
            raise ValueError(f"{self.path} is truncated: tensor {self.name!r} rows {start}:{stop} end past the file")
        return torch.frombuffer(buf, dtype=self.dtype).reshape(stop - start, *self.shape[1:])


def stored_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """{name: StoredTensor} from a safetensors file's header; a header that is not one, or data
    past the end of the file, is a ValueError naming the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is not a safetensors file or is truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: the safetensors header is not JSON: {e!r}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return {name: _stored(path, name, info, 8 + n, size) for name, info in header.items() if name != "__metadata__"}


def _stored(path: Path, name: str, info, data_start: int, size: int) -> StoredTensor:
    """One header entry, checked: a known dtype, a shape of non-negative integers, and data offsets
    spanning exactly shape x dtype bytes inside the file (the rows are read from them)."""
    def bad(what):
        return ValueError(f"{path}: tensor {str(name)[:80]!r} {what}")

    if not isinstance(info, dict):
        raise bad("has no header entry {dtype, shape, data_offsets}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"has dtype {str(dtype)[:20]!r}, which lowbit does not read")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"has shape {str(shape)[:60]}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {str(offsets)[:60]}, not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise bad(f"is {dtype} {shape} ({nbytes} bytes) but its data_offsets span {end - begin} bytes")
    if data_start + end > size:
        raise ValueError(f"{path} is truncated: tensor {name!r} ends at byte {data_start + end} of {size}")
    return StoredTensor(path, name, DTYPES[dtype], tuple(shape), data_start + begin)
