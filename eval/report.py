"""Writing results: the JSON + table + plot every evaluator emits, each file appearing whole or not at all."""

from __future__ import annotations

from typing import Callable

from mixtral_jax.io.output_dir import replace_atomically, write_json
from mixtral_jax.io.paths import write_text

__all__ = ["publish", "replace_atomically", "write_json"]


def publish(result: dict, table: str, out: str | None = None, table_path: str | None = None,
            plot_path: str | None = None, plot: Callable[[dict, str], None] | None = None) -> None:
    """The JSON (`out`), the markdown table (printed, and to `table_path`) and the PNG (`plot_path`)."""
    if out:
        write_json(out, result)
    if table_path:
        write_text(table_path, table if table.endswith("\n") else table + "\n")
    if plot_path and plot is not None:
        plot(result, plot_path)
    print(table)
