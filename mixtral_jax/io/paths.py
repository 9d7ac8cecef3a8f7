"""Local paths or gs:// URLs for run directories and training data, told apart in one place.

A remote path goes through `etils.epath`, as Orbax's own files do: tensorflow's gfile when tensorflow is
installed, else fsspec's gcsfs (the `gcs` extra). A local path keeps plain-file behaviour and error messages.
Only gs:// is accepted: Orbax writes its arrays (through TensorStore) to GCS and local disks only.
"""

from __future__ import annotations

import errno
import os
from typing import IO

from etils import epath

from mixtral_jax.io.output_dir import replace_atomically

SCHEMES = ("gs://",)


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath.Path; a URL of another scheme is refused (epath would take `x://a` for the local `x:/a`)."""
    text = os.fspath(path)
    if is_remote(text) and not text.startswith(SCHEMES):
        raise ValueError(f"{text}: unsupported URL (remote paths must start with {', '.join(SCHEMES)})")
    return epath.Path(text)


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """The file opened for reading bytes; a missing one raises the FileNotFoundError that open() gives."""
    try:
        return as_path(path).open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path)) from None


def write_text(path: str | os.PathLike, text: str) -> None:
    """The whole file at once, never seen half-written: a local file is written beside and renamed; an
    object store makes an upload visible only once complete (and cannot rename atomically)."""
    if is_remote(path):
        as_path(path).write_bytes(text.encode("utf-8"))
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    replace_atomically(os.fspath(path), write)
