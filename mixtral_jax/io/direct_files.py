"""Writing a large file front to back without the page cache (O_DIRECT), for checkpoint shards: a buffered
write leaves gigabytes of dirty cache, throttles the writer to the disk's pace and evicts what the user was
reading. O_DIRECT needs block-aligned buffers, offsets and lengths, so `DirectFile` stages bytes in an aligned
buffer and writes it whole, pads the last block and cuts the file back to its length; an `aligned_empty`
array at a block boundary is written straight from its memory in one call (no copy; large requests keep the
disk busy). Filesystems that refuse O_DIRECT (tmpfs, some FUSE mounts) get plain writes of the same bytes.
Must stay numpy-only: the converters start without JAX.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

import numpy as np

ALIGNMENT = 4096  # the logical block size O_DIRECT needs on the filesystems in use (ext4, xfs)
STAGE_BYTES = 16 << 20


class DirectFile:
    """A new file at `path`, written with sequential `write`s and ended with `close` (or a `with` block)."""

    def __init__(self, path: str | os.PathLike, stage_bytes: int = STAGE_BYTES):
        if stage_bytes % ALIGNMENT:
            raise ValueError(f"stage_bytes must be a multiple of {ALIGNMENT}, not {stage_bytes}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, flags | getattr(os, "O_DIRECT", 0), 0o644)
            self.direct = hasattr(os, "O_DIRECT")
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self._fd = os.open(self.path, flags, 0o644)
            self.direct = False
        self._stage = _anonymous(stage_bytes) if self.direct else None  # page-aligned
        self._filled = 0
        self.size = 0

    def write(self, data) -> None:
        try:
            self._write(data)
        except OSError as err:  # os.write names no file: a full disk is reported with this one's path
            _name(err, self.path)
            raise

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.size += len(view)
        whole = len(view) // ALIGNMENT * ALIGNMENT
        if self.direct and whole and self._filled % ALIGNMENT == 0 and _address(view) % ALIGNMENT == 0:
            if self._filled:  # whole blocks staged before (a header): out first, so the file stays in order
                self._flush_stage(self._filled)
            if self.direct:
                self._write_direct(view[:whole])
                view = view[whole:]
        while len(view) and self.direct:
            n = min(len(view), len(self._stage) - self._filled)
            self._stage[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == len(self._stage):
                self._flush_stage(len(self._stage))
        if len(view):  # buffered (the stage is empty then)
            _write_all(self._fd, view)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self.direct and self._filled:
                padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
                self._stage[self._filled:padded] = bytes(padded - self._filled)
                self._flush_stage(padded)
                os.ftruncate(self._fd, self.size)
        except OSError as err:
            _name(err, self.path)
            raise
        finally:
            self._release()

    def _release(self) -> None:
        """Closes the file and frees the stage, without writing what is staged."""
        fd, self._fd = self._fd, -1
        stage, self._stage = self._stage, None
        try:
            os.close(fd)
        finally:
            if stage is not None:
                try:
                    stage.close()
                except BufferError:  # a view of it outlives the write that failed (in that error's traceback):
                    pass  # the memory is unmapped when the last view goes; the error is the one to report

    def _flush_stage(self, length: int) -> None:
        """Writes the stage's first `length` bytes and empties it."""
        self._write_direct(memoryview(self._stage)[:length], self._filled)
        self._filled = 0

    def _write_direct(self, view: memoryview, true_length: int | None = None) -> None:
        """Writes `view` (aligned) whole. A filesystem that opened the file with O_DIRECT but refuses a write
        (EINVAL, before any byte of it is written) gets the rest, unpadded to `true_length`, and every later
        write buffered."""
        done = 0
        while done < len(view):
            try:
                done += os.write(self._fd, view[done:])
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                if true_length is not None:  # no padding: the file is cut to its size anyway
                    view = view[:true_length]

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:  # the write failed: nothing more goes to the file (its writer removes it), and the
            self._release()  # error that ended it is the one raised, not a second from the staged bytes


def _name(err: OSError, path: str) -> None:
    if err.filename is None:
        err.filename = path


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


def _address(view: memoryview) -> int:
    return np.frombuffer(view, np.uint8).ctypes.data if len(view) else 0


def _anonymous(nbytes: int) -> mmap.mmap:
    """Page-aligned private memory (`mmap.mmap(-1, n)` alone is shared memory, which faults in page by page
    at several times the cost), in huge pages where the kernel has them, as numpy's own large arrays are."""
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return memory


def aligned_empty(shape, dtype) -> np.ndarray:
    """A new array whose buffer starts on a page (freed with the array), which `DirectFile.write` writes
    without a copy."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(_anonymous(count * dtype.itemsize), dtype, count).reshape(shape)


__all__ = ["ALIGNMENT", "DirectFile", "aligned_empty"]
