"""Outputs appear whole or not at all: a directory or a file is written as a temporary sibling, which
replaces the destination only once complete (a directory's files synced to disk first); on failure (an error,
Ctrl-C) it is removed and the destination is untouched. An OSError about the temporary sibling (a full disk, a
read-only one) names the destination instead: the path the user gave, not one that no longer exists."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator


@contextlib.contextmanager
def output_directory(path: str) -> Iterator[str]:
    """Yields the temporary directory to write into; on a clean exit it becomes `path` (an old `path` is
    moved aside first and deleted only once the new one is in place)."""
    parent = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}.tmp-"
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    except OSError as err:
        _as_destination(err, os.path.join(parent, prefix), path, whole=True)
        raise
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private mode is for the build, not the result
        _sync_tree(tmp)
        _replace_directory(tmp, path)
        _sync(parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _as_destination(err, tmp, path)
        raise


def _as_destination(err: BaseException, tmp: str, path: str, whole: bool = False) -> None:
    """An OSError about `tmp` or a file under it told about `path` or the same file under it; with `whole`,
    about any name that starts with `tmp` (a prefix: the temporary sibling that could not be made), `path`."""
    name = err.filename if isinstance(err, OSError) else None
    if not isinstance(name, str):
        return
    if whole and name.startswith(tmp):
        err.filename = os.fspath(path)
    elif name == tmp or name.startswith(tmp + os.sep):
        err.filename = os.fspath(path) + name[len(tmp):]


def _sync_tree(root: str) -> None:
    """Every file and folder under `root` on disk before the rename publishes it: otherwise a crash soon after
    could leave a complete-looking output with empty files. The files are synced from several threads at once,
    so that the disk gets all their writes queued together rather than one file's at a time."""
    files, folders = [], []
    for folder, _, names in os.walk(root):
        files += [os.path.join(folder, name) for name in names]
        folders.append(folder)
    with ThreadPoolExecutor(8, thread_name_prefix="fsync") as pool:
        list(pool.map(_sync, files))
    for folder in reversed(folders):
        _sync(folder)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_directory(new: str, path: str) -> None:
    if not os.path.exists(path):
        os.rename(new, path)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(os.path.abspath(path)))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` into a temporary sibling, then rename: a reader never sees a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    except OSError as err:
        _as_destination(err, os.path.join(folder, prefix), path, whole=True)
        raise
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the results from other users
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _as_destination(err, tmp, path)
        raise


def write_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")

    replace_atomically(path, write)


