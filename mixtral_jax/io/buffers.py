"""Host buffers and transposes for the converters, which move every weight of a 93 GB model through the host.

`transpose_into` turns HF's [out, in] into our [in, out] 16 bytes at a time, in cache-sized tiles, rows split
over threads: about 3x numpy's `out[...] = src.T` for bf16 and 2x for fp32 (117 MB expert matrix: 45 ms). The
buffers (`BufferRing`, `ThreadBuffer`, `OneEntryCache`) are reused, page-aligned arrays, because the kernel
faults fresh memory in about as slowly as the disk fills it. Numpy only: no JAX here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mixtral_jax.io.direct_files import aligned_empty

_UNIT = 16  # bytes moved per element of the first copy
_BLOCK = 256  # rows of `src` per block (by elements)
_TILE = (512, 64)  # rows of `src` and 16-byte units of a row per tile (by units): a 512 KB scratch stays in cache
_BITS = (1, 2, 4, 8)  # element sizes copied as unsigned integers
_POOL: list[ThreadPoolExecutor] = []


def transpose_into(src: np.ndarray, out: np.ndarray, threads: int = 2) -> np.ndarray:
    """`out[...] = src.T` for a 2-D `src` (cast to out's dtype), split over `threads` threads."""
    rows, cols = src.shape
    if out.shape != (cols, rows):
        raise ValueError(f"transpose_into: out has shape {out.shape}, expected {(cols, rows)}")
    result = out
    if src.dtype == out.dtype and src.itemsize in _BITS:  # plain integers: numpy's fast copy loops
        bits = np.dtype(f"u{src.itemsize}")  # (ml_dtypes' bfloat16 copies element by element)
        src, out = src.view(bits), out.view(bits)
    part = _by_units if _units_apply(src, out) else _by_elements
    if threads <= 1 or src.nbytes < (8 << 20):
        part(src, out, 0, rows)
        return result
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max(threads - 1, 1), thread_name_prefix="transpose"))
    edges = [rows * k // threads // _TILE[0] * _TILE[0] for k in range(threads)] + [rows]
    futures = [_POOL[0].submit(part, src, out, edges[k], edges[k + 1]) for k in range(1, threads)]
    part(src, out, edges[0], edges[1])
    for future in futures:
        future.result()
    return result


def _units_apply(src: np.ndarray, out: np.ndarray) -> bool:
    """Whether a row of `src` splits into whole 16-byte units (and no cast or odd layout is involved). `out`
    may be a block of columns of a larger matrix (its rows contiguous), as the converters' row-block reads
    fill."""
    return (src.dtype == out.dtype and src.flags.c_contiguous and out.strides[1] == out.itemsize
            and _UNIT % src.itemsize == 0 and (src.shape[1] * src.itemsize) % _UNIT == 0)


def _by_elements(src: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    for i in range(lo, hi, _BLOCK):
        j = min(i + _BLOCK, hi)
        out[:, i:j] = src[i:j].T


def _by_units(src: np.ndarray, out: np.ndarray, lo: int, hi: int) -> None:
    rows, cols = src.shape
    per_unit = _UNIT // src.itemsize
    groups = cols // per_unit
    tile_rows, tile_groups = _TILE
    units = src.view(np.uint8).reshape(rows, cols * src.itemsize).view(np.complex128)  # [rows, groups]
    scratch = np.empty((tile_groups, tile_rows, per_unit), src.dtype)
    scratch_units = scratch.view(np.uint8).reshape(tile_groups, tile_rows * _UNIT).view(np.complex128)
    grouped_out = out.reshape(groups, per_unit, rows, copy=False)  # a view, also of a column block
    for g in range(0, groups, tile_groups):
        h = min(g + tile_groups, groups)
        for i in range(lo, hi, tile_rows):
            j = min(i + tile_rows, hi)
            scratch_units[:h - g, :j - i] = units[i:j, g:h].T  # scratch[u, r, :] = src[i + r, units g + u]
            grouped_out[g:h, :, i:j] = scratch[:h - g, :j - i, :].transpose(0, 2, 1)


class ThreadBuffer:
    """`take(shape, dtype)`: one scratch buffer per thread, reused (grown when too small), for data that a
    thread fills and uses up before it asks again."""

    def __init__(self):
        self._local = threading.local()

    def take(self, shape, dtype) -> np.ndarray:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        held = getattr(self._local, "buffer", None)
        if held is None or held.dtype != dtype or held.size < size:
            held = self._local.buffer = np.empty(size, dtype)
        return held[:size].reshape(shape)


class BufferRing:
    """`take(shape, dtype)` returns one of `depth` buffers kept for that shape and dtype, in turn: a buffer
    stays valid until `depth` more buffers of its shape were taken, so a producer that is at most `depth - 1`
    arrays ahead of its consumer never overwrites one in use. Arrays under `min_bytes` are allocated fresh,
    and shapes beyond the `max_shapes` most recently used are dropped, so the ring holds at most
    `depth * max_shapes` large buffers. They are page-aligned, so O_DIRECT writes them without a copy."""

    def __init__(self, depth: int = 2, min_bytes: int = 16 << 20, max_shapes: int = 2):
        self.depth, self.min_bytes, self.max_shapes = depth, min_bytes, max_shapes
        self._rings: dict[tuple, tuple[list[np.ndarray], list[int]]] = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype) -> np.ndarray:
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize < self.min_bytes:
            return np.empty(shape, dtype)
        key = (shape, dtype.str)
        with self._lock:
            buffers, turn = self._rings.pop(key, ([], [0]))
            self._rings[key] = (buffers, turn)  # most recently used last
            while len(self._rings) > self.max_shapes:
                del self._rings[next(iter(self._rings))]
            index = turn[0] % self.depth
            turn[0] += 1
            if index == len(buffers):
                buffers.append(aligned_empty(shape, dtype))
            return buffers[index]


class OneEntryCache:
    """The last value `read(*key)` returned, kept until another key is asked: the converters read a whole
    layer-tensor once for all the experts' matrices taken from it. Safe to use from several threads."""

    def __init__(self, read):
        self._read = read
        self._key: tuple | None = None
        self._value = None
        self._lock = threading.Lock()

    def get(self, *key):
        with self._lock:
            if self._key != key:
                self._key, self._value = None, None  # the old value freed before the new one is read
                self._value = self._read(*key)
                self._key = key
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._key, self._value = None, None


__all__ = ["BufferRing", "OneEntryCache", "ThreadBuffer", "transpose_into"]
