"""output_dir: outputs appear whole (synced to disk, then renamed) or not at all."""

import os

import pytest

from mixtral_jax.io import output_dir
from mixtral_jax.io.output_dir import output_directory, replace_atomically


@pytest.fixture
def synced(monkeypatch):
    """The real paths fsynced, each with whether the destination existed yet at that moment."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(output_dir.os, "fsync", fsync)
    return calls


def test_directory_is_synced_then_renamed(tmp_path, synced):
    out = tmp_path / "model"
    with output_directory(str(out)) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        for name in ("a.safetensors", "sub/b.json"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
        assert not out.exists()
    assert sorted(p.name for p in out.rglob("*")) == ["a.safetensors", "b.json", "sub"]
    assert {os.path.basename(p) for p in synced[:-1]} >= {"a.safetensors", "b.json", "sub"}
    assert all(".model.tmp-" in p for p in synced[:-1]), "every file synced under its temporary name"
    assert synced[-1] == str(tmp_path), "the rename itself made durable"


def test_failure_leaves_the_old_output(tmp_path, synced):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with output_directory(str(out)) as tmp:
            with open(os.path.join(tmp, "new.json"), "w") as f:
                f.write("{")
            raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["old.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert synced == []


def test_replace_atomically_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        replace_atomically(str(path), broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_disk_errors_name_the_destination_not_the_temporary(tmp_path):
    """A full disk while writing (or a folder that cannot be made) is reported about the path the caller
    gave, which the user knows, not about the temporary sibling, which is gone by then."""
    import errno

    out = tmp_path / "model"
    with pytest.raises(OSError) as info:
        with output_directory(str(out)) as tmp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(tmp, "a.safetensors"))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out / "a.safetensors")
    assert list(tmp_path.iterdir()) == []

    path = tmp_path / "metrics.json"

    def full(tmp):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), tmp)

    with pytest.raises(OSError) as info:
        replace_atomically(str(path), full)
    assert info.value.filename == str(path) and list(tmp_path.iterdir()) == []

    with pytest.raises(OSError) as info:  # another file's error keeps its name
        with output_directory(str(out)):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), "/elsewhere/x")
    assert info.value.filename == "/elsewhere/x"
