"""Outputs appear whole or not at all: everything is written into a temporary sibling directory, which
replaces the destination only once complete; on failure it is removed and the destination is untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def output_directory(path: str) -> Iterator[str]:
    """Yields the temporary directory to write into; on a clean exit it becomes `path` (an old `path` is
    moved aside first and deleted only once the new one is in place)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's private mode is for the build, not the result
        _replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
