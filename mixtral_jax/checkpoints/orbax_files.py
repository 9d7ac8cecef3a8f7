"""Writing an Orbax PyTree checkpoint ourselves, one array at a time: the files that Orbax's `ocp.save(path,
tree)` writes with `use_ocdbt=False` and `use_compression=False`, so Orbax (and the reader in orbax_format.py)
restores it as its own, onto any mesh.

    DIR/_CHECKPOINT_METADATA, DIR/orbax.checkpoint, DIR/commit_success.txt
    DIR/state/_METADATA                     the tree: each leaf's key path, value type np.ndarray
    DIR/state/<k1.k2.k3>/zarr.json          zarr3 metadata: a regular grid of chunks (default one, the whole
                                            array), each in a sharding_indexed codec
    DIR/state/<k1.k2.k3>/c/0/0              a chunk's file (c/i/j for chunk (i, j)): its bytes (C order,
                                            little-endian), then the shard index (offset, length as u64) and
                                            its crc32c

Chunks the size of one device's shard on a mesh are what Orbax writes for an array sharded on that mesh, so
that restoring onto it reads each device's chunk alone (`convert hf-to-orbax --mesh`).

Why not Orbax's own writer: TensorStore writes through the page cache, which on the 2-core CI VM costs ~3 ms
of system time per MB once a few GB are dirty, and Orbax's saves cannot overlap within one process (it keeps
the save's operation id in a global), so a converter had to start a process per writer. Here each shard file
is written with O_DIRECT (io/direct_files.py) from any thread. `read_into` reads such an array back onto the host
with plain file reads into the caller's array (TensorStore reads into memory of its own, then copies).
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np

from mixtral_jax.io.direct_files import DirectFile

STATE = "state"  # the item Orbax v1 saves a tree as

# numpy dtype -> zarr3 data_type, as TensorStore names them
_DATA_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16",
               "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64", "float16": "float16",
               "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), which zarr3's crc32c codec appends; only ever over a 16-byte shard index."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def zarr_metadata(shape: tuple, dtype: np.dtype, chunk_shape: tuple | None = None) -> dict:
    """The zarr.json TensorStore writes for an array Orbax saves uncompressed, in chunks of `chunk_shape`
    (default: the whole array)."""
    dtype = np.dtype(dtype)
    if dtype.name not in _DATA_TYPES:
        raise TypeError(f"no zarr3 data type for {dtype}")
    shape = [int(n) for n in shape]
    chunk = shape if chunk_shape is None else [int(n) for n in chunk_shape]
    inner = {"name": "bytes"} if dtype.itemsize == 1 else {"configuration": {"endian": "little"}, "name": "bytes"}
    return {"chunk_grid": {"configuration": {"chunk_shape": chunk}, "name": "regular"},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"configuration": {"chunk_shape": chunk, "codecs": [inner],
                                          "index_codecs": [{"configuration": {"endian": "little"}, "name": "bytes"},
                                                           {"name": "crc32c"}]},
                        "name": "sharding_indexed"}],
            "data_type": _DATA_TYPES[dtype.name], "fill_value": 0.0 if "float" in dtype.name else 0,
            "node_type": "array", "shape": shape, "zarr_format": 3}


def chunks(shape: tuple, chunk_shape: tuple) -> list[tuple[list[str], tuple]]:
    """Each chunk of a regular grid: its file's path parts under `c/` and its slice of the array."""
    shape, chunk_shape = tuple(int(n) for n in shape), tuple(int(n) for n in chunk_shape)
    if len(chunk_shape) != len(shape) or any(n <= 0 or size % n for size, n in zip(shape, chunk_shape)):
        raise ValueError(f"chunk shape {list(chunk_shape)} does not divide array shape {list(shape)}")
    grid = [size // n for size, n in zip(shape, chunk_shape)]
    return [([str(i) for i in index] or ["0"], tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, chunk_shape)))
            for index in np.ndindex(*grid)]


def read_into(directory: str | os.PathLike, keys: tuple[str, ...], out: np.ndarray) -> bool:
    """Fills `out` (C-contiguous) with leaf `keys` of the checkpoint at `directory` if that leaf is stored as
    `PyTreeWriter` stores it (whole or in chunks), with `out`'s shape and dtype, and every shard index is
    intact; False otherwise (OCDBT, compressed, another shape: Orbax reads those), `out` then unspecified."""
    path = os.path.join(os.fspath(directory), STATE, ".".join(keys))
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as f:
            metadata = json.load(f)
        chunk_shape = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
        if (out.ndim == 0 or not out.flags.c_contiguous or out.dtype.name not in _DATA_TYPES
                or metadata != zarr_metadata(out.shape, out.dtype, chunk_shape)):
            return False
        return all(_read_chunk(os.path.join(path, "c", *parts), out[index]) for parts, index in
                   chunks(out.shape, chunk_shape))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _read_chunk(path: str, out: np.ndarray) -> bool:
    """One chunk's file into `out` (a view: read straight in where it is contiguous)."""
    target = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, 20, size - 20) if size >= 20 else b""
        if len(tail) != 20 or struct.unpack("<I", tail[16:])[0] != crc32c(tail[:16]) or \
                struct.unpack("<QQ", tail[:16]) != (0, target.nbytes) or target.nbytes > size - 20:
            return False
        view = memoryview(target.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], done)
            if n == 0:
                return False
            done += n
    finally:
        os.close(fd)
    if target is not out:
        out[...] = target
    return True


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class PyTreeWriter:
    """A new Orbax PyTree checkpoint at `directory`: `write(keys, array)` for each leaf (from any thread,
    each key once), then `finalize()`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        os.makedirs(os.path.join(self.directory, STATE))
        self._keys: list[tuple[str, ...]] = []
        self._started = time.time_ns()

    def write(self, keys: tuple[str, ...], array: np.ndarray, chunk_shape: tuple | None = None) -> None:
        """Leaf `keys`, whole or in chunks of `chunk_shape` (which must divide its shape)."""
        array = np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        chunk_shape = tuple(array.shape) if chunk_shape is None else tuple(chunk_shape)
        path = os.path.join(self.directory, STATE, ".".join(keys))
        os.makedirs(path)  # a key written twice is refused here
        for parts, index in chunks(array.shape, chunk_shape):
            os.makedirs(os.path.join(path, "c", *parts[:-1]), exist_ok=True)
            block = np.ascontiguousarray(array[index])  # a view where the chunk is contiguous (whole, or rows)
            header = struct.pack("<QQ", 0, block.nbytes)
            with DirectFile(os.path.join(path, "c", *parts)) as f:
                f.write(block.reshape(-1).view(np.uint8))
                f.write(header + struct.pack("<I", crc32c(header)))
        with open(os.path.join(path, "zarr.json"), "w") as f:
            f.write(_compact(zarr_metadata(array.shape, array.dtype, chunk_shape)))
        self._keys.append(tuple(keys))

    def finalize(self) -> None:
        """The tree metadata and the checkpoint's own files, written once every leaf is on disk."""
        tree = {str(keys): {"key_metadata": [{"key": key, "key_type": 2} for key in keys],
                            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                for keys in sorted(self._keys)}
        with open(os.path.join(self.directory, STATE, "_METADATA"), "w") as f:
            f.write(json.dumps({"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
                                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
        handler = "orbax.checkpoint.experimental.v1._src.handlers.pytree_handler.PyTreeHandler"
        with open(os.path.join(self.directory, "_CHECKPOINT_METADATA"), "w") as f:
            f.write(json.dumps({"item_handlers": {STATE: handler}, "metrics": {}, "performance_metrics": {},
                                "init_timestamp_nsecs": self._started, "commit_timestamp_nsecs": time.time_ns(),
                                "custom_metadata": {}}))
        open(os.path.join(self.directory, "orbax.checkpoint"), "w").close()
        with open(os.path.join(self.directory, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {self.directory}")


__all__ = ["PyTreeWriter", "chunks", "crc32c", "read_into", "zarr_metadata"]
