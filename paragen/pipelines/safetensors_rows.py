"""Reading rows of the tensors in a folder's safetensors files with plain file reads.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte
range in the data that follows), then the data, each tensor row-major; rows `[first, first + count)` of a tensor
are therefore one contiguous byte range. Reading them with `readinto` touches only those bytes: no memory map whose
pages would count against the process (reading a whole checkpoint through a map made each rank's resident memory
peak at the shards it keeps plus every page it had read), and no copy of the whole tensor.
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
    """Where one tensor lies in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of its data in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()


def index_folder(folder: Path, pattern: str = "*.safetensors") -> dict[str, StoredTensor]:
    """Every tensor of the safetensors files in `folder`, by name (headers only)."""
    tensors = {}
    for path in sorted(folder.glob(pattern)):
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                tensors[name] = StoredTensor(path, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                             8 + length + entry["data_offsets"][0])
    return tensors


def read_rows(stored: StoredTensor, first: int = 0, count: int | None = None) -> torch.Tensor:
    """Rows `[first, first + count)` of a stored tensor (default: all of it), read from its file, on the CPU."""
    if not stored.shape:
        count, shape = 1, ()
    else:
        count = stored.shape[0] - first if count is None else count
        shape = (count, *stored.shape[1:])
    out = torch.empty(shape, dtype=stored.dtype)
    with open(stored.path, "rb") as file:
        file.seek(stored.start + first * stored.row_bytes)
        file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
    return out


__all__ = ["DTYPES", "StoredTensor", "index_folder", "read_rows"]
