"""Reading and writing safetensors files as numpy arrays, bfloat16 included.

`safetensors.numpy` cannot hold bfloat16 (numpy has no such dtype), so we read the format ourselves: an
8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes. Tensors are memory
mapped, so reading one tensor of a 5 GB shard touches only that tensor's bytes; `SafetensorsFile.read` copies
one tensor (or one slab of it) into a fresh array with plain file reads instead, which the streaming converters
use: a memory map's touched pages count towards the process's resident memory until it is dropped, a read
buffer's only while the array lives. Every malformed file gives a
`CheckpointError` that names the file (and the tensor).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.direct_files import ALIGNMENT, DirectFile

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """The tensors of one file, each read on demand through a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (length {header_len} "
                                          f"in a file of {size} bytes)")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            if isinstance(entry, dict) and entry.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {entry.get('dtype')!r} "
                                      f"(supported: {', '.join(DTYPES)})")
            try:
                dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor '{name}' has a malformed header entry "
                                      f"{entry!r}") from None
            if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
                raise CheckpointError(f"{self.path}: tensor '{name}' byte range does not match its shape {shape}")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor '{name}' ends at byte "
                                      f"{self._data_start + end} but the file has {size} bytes")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (no copy until used)."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        begin, end = self._entries[name]["data_offsets"]
        shape, dtype = self.shape(name), self.dtype(name)
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

    def read(self, name: str, prefix: tuple[int, ...] = (), rows: slice | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
        """`tensor[prefix][rows]` (integer indices into the leading axes, then an optional step-1 slice of the
        next axis: always one contiguous byte range) read with plain file reads into a fresh array (or `out`,
        C-contiguous, of that shape and dtype). Nothing stays mapped."""
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        begin, _ = self._entries[name]["data_offsets"]
        shape, dtype = self.shape(name), self.dtype(name)
        if len(prefix) + (rows is not None) > len(shape):
            raise IndexError(f"{name}: index {prefix} {rows} has more axes than shape {shape}")
        strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        offset = 0
        for axis, i in enumerate(prefix):
            if not 0 <= i < shape[axis]:
                raise IndexError(f"{name}: index {i} out of range for axis {axis} of shape {shape}")
            offset += i * strides[axis]
        sub = shape[len(prefix):]
        if rows is not None:
            start, stop, step = rows.indices(sub[0])
            if step != 1:
                raise ValueError("rows must be a step-1 slice")
            offset += start * strides[len(prefix)]
            sub = (max(stop - start, 0), *sub[1:])
        if out is None:
            out = np.empty(sub, dtype)
        elif out.shape != tuple(sub) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{name}: out must be C-contiguous {dtype} {tuple(sub)}, not {out.dtype} {out.shape}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        position = self._data_start + begin + offset * dtype.itemsize
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                n = os.preadv(f.fileno(), [view[done:done + (256 << 20)]], position + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: truncated file while reading tensor '{name}'")
                done += n
        return out


def header_bytes(entries: Iterable[tuple[str, np.dtype, tuple]], metadata: Mapping[str, str] | None = None) -> bytes:
    """The start of a safetensors file holding `entries` (name, dtype, shape) in order, back to back: the
    8-byte header length, then the JSON header padded with spaces (as the format allows) so that the tensor
    bytes start on a disk block, where `DirectFile` writes a page-aligned array without copying it."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGNMENT)
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors in order; the header is computed from shapes first, then each tensor is streamed."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    with DirectFile(path) as f:
        f.write(header_bytes([(name, array.dtype, array.shape) for name, array in items], metadata))
        for _, array in items:
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
