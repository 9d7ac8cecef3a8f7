"""DirectFile: the bytes on disk are exactly those written, whatever the sizes and split of the writes, with
O_DIRECT where the filesystem takes it and buffered writes where it does not."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from mixtral_jax.io import direct_files as direct_io
from mixtral_jax.io.direct_files import ALIGNMENT, DirectFile


@pytest.mark.parametrize("sizes", [[0], [1], [ALIGNMENT], [8, 1000, 3 * ALIGNMENT + 5], [70_000, 1, 65_536, 12_345]])
def test_bytes_on_disk_equal_those_written(tmp_path, sizes):
    rng = np.random.default_rng(len(sizes))
    chunks = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    path = tmp_path / "out.bin"
    with DirectFile(path, stage_bytes=4 * ALIGNMENT) as f:  # a small stage: many full writes, then a tail
        for chunk in chunks:
            f.write(chunk)
    assert f.size == sum(sizes)
    assert path.read_bytes() == b"".join(c.tobytes() for c in chunks)


def test_o_direct_is_used_where_the_filesystem_takes_it(tmp_path):
    with DirectFile(tmp_path / "a.bin") as f:
        f.write(b"x" * 10)
        direct = f.direct
    try:
        fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        os.close(fd)
        supported = True
    except OSError:
        supported = False
    assert direct == supported


def test_filesystems_without_o_direct_get_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing)
    data = np.arange(10_000, dtype=np.uint16)
    with DirectFile(tmp_path / "b.bin") as f:
        f.write(data.view(np.uint8))
    assert not f.direct
    assert np.array_equal(np.fromfile(tmp_path / "b.bin", np.uint16), data)


def test_a_stage_that_is_not_block_aligned_is_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        DirectFile(tmp_path / "c.bin", stage_bytes=5000)
    assert not (tmp_path / "c.bin").exists()


def test_a_refused_direct_write_falls_back_to_buffered(tmp_path, monkeypatch):
    """A filesystem that opens with O_DIRECT but refuses the aligned write (EINVAL) mid-file."""
    import fcntl

    real_write = os.write
    calls = []

    def refusing_second_direct_write(fd, data):
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        calls.append(direct)
        if direct and len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", refusing_second_direct_write)
    data = np.random.default_rng(5).integers(0, 256, 5 * ALIGNMENT + 77, dtype=np.uint8)
    with DirectFile(tmp_path / "d.bin", stage_bytes=2 * ALIGNMENT) as f:
        for piece in np.array_split(data, 4):
            f.write(piece)
    assert f.direct is False and calls[0] and not calls[-1]
    assert (tmp_path / "d.bin").read_bytes() == data.tobytes()


def test_page_aligned_arrays_are_written_whole_from_where_they_are(tmp_path, monkeypatch):
    """After whole blocks were staged (a safetensors header), an `aligned_empty` array goes to the disk in one
    write straight from its buffer; only its last partial block is staged."""
    from mixtral_jax.io.direct_files import aligned_empty

    real_write = os.write
    lengths = []

    def recording(fd, data):
        lengths.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", recording)
    header = b"h" * ALIGNMENT
    array = aligned_empty((10 * ALIGNMENT + 5,), np.uint8)
    array[...] = np.random.default_rng(7).integers(0, 256, array.size, dtype=np.uint8)
    with DirectFile(tmp_path / "e.bin", stage_bytes=4 * ALIGNMENT) as f:
        f.write(header)
        f.write(array)
    assert (tmp_path / "e.bin").read_bytes() == header + array.tobytes()
    if f.direct:
        assert lengths == [ALIGNMENT, 10 * ALIGNMENT, ALIGNMENT]  # the header, the array, its padded tail
