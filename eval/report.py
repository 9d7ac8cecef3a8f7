"""Writing results: files that appear whole or not at all, and the JSON + table + plot every evaluator emits."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` into a temporary sibling, then rename: a reader never sees a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the results from other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")

    replace_atomically(path, write)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    replace_atomically(path, write)


def publish(result: dict, table: str, out: str | None = None, table_path: str | None = None,
            plot_path: str | None = None, plot: Callable[[dict, str], None] | None = None) -> None:
    """The JSON (`out`), the markdown table (printed, and to `table_path`) and the PNG (`plot_path`)."""
    if out:
        write_json(out, result)
    if table_path:
        write_text(table_path, table)
    if plot_path and plot is not None:
        plot(result, plot_path)
    print(table)
