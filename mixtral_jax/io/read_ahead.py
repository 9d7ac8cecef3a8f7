"""Reading ahead of a writer: the next few arrays are read (file copies, transposes) on threads while the
caller writes one, so the disk and the cores stay busy together. Each read fills a buffer of a ring taken in
order at submission, so a buffer comes back only after the array that last held it was consumed (fresh memory
for every array costs the kernel as much as the copy into it), and at most `depth + 1` arrays are held."""

from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from mixtral_jax.io.buffers import BufferRing

T = TypeVar("T")
Job = tuple[Callable[[np.ndarray], T], tuple, np.dtype]  # (read into this buffer, buffer shape, buffer dtype)


def read_ahead(jobs: Sequence[Job], depth: int) -> Iterator[T]:
    """Each job's result in order, the next `depth` jobs running on as many threads; a failed read is raised
    in order. The jobs must be safe to run concurrently when `depth` > 1."""
    ring = BufferRing(depth=depth + 1)
    with ThreadPoolExecutor(depth, thread_name_prefix="read-ahead") as pool:

        def submit(job: Job):
            read, shape, dtype = job
            return pool.submit(read, ring.take(shape, dtype))

        pending = collections.deque(submit(job) for job in jobs[:depth])
        try:
            for i in range(len(jobs)):
                result = pending.popleft().result()
                if i + depth < len(jobs):
                    pending.append(submit(jobs[i + depth]))
                yield result
                del result
        finally:
            for future in pending:
                future.cancel()


__all__ = ["read_ahead"]
