"""host_arrays: transposes with the same bytes as numpy's, for every bit pattern; buffers reused in turn."""

import ml_dtypes
import numpy as np
import pytest

from mixtral_jax.io.buffers import BufferRing, transpose_into


def random_bits(shape, dtype, seed=0):
    """Every bit pattern is possible (NaN payloads, infinities, denormals), so a copy that goes through
    floating point arithmetic would show."""
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, np.float16, np.uint8, np.float64])
@pytest.mark.parametrize("shape", [(300, 64), (64, 520), (7, 24), (513, 33)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bytes_equal_numpy_transpose(dtype, shape, threads):
    src = random_bits(shape, dtype)
    out = np.zeros(shape[::-1], dtype)
    assert transpose_into(src, out, threads=threads) is out
    assert np.array_equal(out.view(np.uint8), np.ascontiguousarray(src.T).view(np.uint8))


def test_threads_split_a_large_matrix():
    """Over 8 MB the rows are split over threads at block edges that are not the matrix's end."""
    src = random_bits((1100, 4096), ml_dtypes.bfloat16, seed=1)
    out = np.empty((4096, 1100), ml_dtypes.bfloat16)
    assert transpose_into(src, out, threads=3) is out
    assert np.array_equal(out.view(np.uint16), src.view(np.uint16).T)


def test_casts_and_views():
    src = np.arange(48, dtype=np.float32).reshape(6, 8)
    out = np.empty((8, 6), ml_dtypes.bfloat16)
    np.testing.assert_array_equal(transpose_into(src, out).astype(np.float32), src.T)
    wide = np.zeros((8, 12), np.float32)
    transpose_into(src, wide[:, :6], threads=1)  # a non-contiguous destination
    np.testing.assert_array_equal(wide[:, :6], src.T)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_block_of_columns_is_filled_and_nothing_else(threads, monkeypatch):
    """The converters read a large weight in row blocks, each transposed into a block of columns: by 16-byte
    units, as a whole matrix is (the element-by-element copy was ~2.5x slower)."""
    from mixtral_jax.io import buffers as host_arrays

    monkeypatch.setattr(host_arrays, "_by_elements", None)
    src = random_bits((1100, 4096), ml_dtypes.bfloat16, seed=2)
    wide = np.zeros((4096, 3000), ml_dtypes.bfloat16)
    assert transpose_into(src, wide[:, 700:1800], threads=threads) is not None
    assert np.array_equal(wide[:, 700:1800].view(np.uint16), src.view(np.uint16).T)
    assert not wide[:, :700].view(np.uint16).any() and not wide[:, 1800:].view(np.uint16).any()


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="expected"):
        transpose_into(np.zeros((4, 8), np.float32), np.zeros((4, 8), np.float32))


def test_ring_hands_out_buffers_in_turn():
    ring = BufferRing(depth=2, min_bytes=64, max_shapes=2)
    a, b, c, d = (ring.take((4, 8), np.float32) for _ in range(4))
    assert a is not b and a is c and b is d
    other = ring.take((8, 4), np.float32)
    assert other is not a and other.shape == (8, 4)
    assert ring.take((4, 8), np.float32) is a  # still one of the two most recent shapes
    ring.take((2, 16), np.float32)  # a third shape drops the least recently used, (8, 4)
    assert ring.take((8, 4), np.float32) is not other
    assert ring.take((4, 8), np.uint8).dtype == np.uint8  # dtype is part of the key (and 32 B is below min_bytes)
    small = ring.take((2,), np.float32)
    assert small is not ring.take((2,), np.float32)


def test_thread_buffer_is_reused_per_thread_and_grown():
    import threading

    from mixtral_jax.io.buffers import ThreadBuffer

    scratch = ThreadBuffer()
    a = scratch.take((4, 8), np.float32)
    b = scratch.take((8, 2), np.float32)  # smaller: the same memory
    assert b.shape == (8, 2) and np.shares_memory(a, b)
    c = scratch.take((10, 8), np.float32)  # larger: a new buffer
    assert not np.shares_memory(a, c) and scratch.take((3,), np.float32).base is c.base
    assert scratch.take((3,), np.int32).dtype == np.int32
    other = []
    thread = threading.Thread(target=lambda: other.append(scratch.take((10, 8), np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(other[0], c)  # each thread its own
