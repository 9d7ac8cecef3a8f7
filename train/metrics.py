"""The run's metrics: one JSON object per logged step in `metrics.jsonl`, the same scalars as TensorBoard
events, and a progress bar on the console. Only process 0 writes.

A local log is flushed row by row. Object stores (a gs:// run_dir) cannot append, so there both files are
rewritten whole: at most every REMOTE_FLUSH_SECONDS, at each checkpoint and at the end.
"""

from __future__ import annotations

import io
import json
import math
import os
import time

import numpy as np

from mixtral_jax.io import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REMOTE_FLUSH_SECONDS = 60.0


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class _RemoteEventFile:
    """A TensorBoard event file on gs://, uploaded whole at each flush through epath (gcsfs or tf), as
    everything else of the run is; tensorboardX's own gs:// writer needs google-cloud-storage and uploads
    again when garbage-collected."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed = path, io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        paths.as_path(self.path).write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _RemoteEventFiles:
    """tensorboardX's writer factory interface."""

    open = staticmethod(_RemoteEventFile)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories


class MetricsLog:
    def __init__(self, run_dir: str, resume_step: int, enabled: bool = True):
        """Rows past `resume_step` (steps after the last checkpoint of an interrupted run) are dropped, so the
        file reads as one uninterrupted run."""
        self.enabled = enabled
        self.remote = paths.is_remote(run_dir)
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = self._writer = None
        self._text, self._flushed = "", time.monotonic()
        if not enabled:
            return
        if paths.as_path(self.path).exists():
            with paths.open_binary(self.path) as f:
                self._text = "".join(line.decode("utf-8") for line in f
                                     if line.strip() and json.loads(line)["step"] <= resume_step)
        paths.write_text(self.path, self._text)
        if not self.remote:
            self._file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter
        from tensorboardX.record_writer import register_writer_factory

        register_writer_factory("gs", _RemoteEventFiles())
        self._writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False) + "\n"
        if self.remote:
            self._text += line
        else:
            self._file.write(line)
        step = row["step"]
        for name, value in row.items():
            if name == "expert_share":
                for layer, shares in enumerate(value):
                    self._writer.add_scalars(f"experts/layer_{layer}",
                                             {f"expert_{e}": s for e, s in enumerate(shares)}, step)
            elif name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        if not self.remote or time.monotonic() - self._flushed >= REMOTE_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            paths.write_text(self.path, self._text)
        else:
            self._file.flush()
        self._writer.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._file is not None:
                self._file.close()
            self._writer.close()


def expert_share(expert_tokens: np.ndarray) -> list[list[float]]:
    """[L, E] assignment counts -> each layer's share of assignments per expert (rows sum to 1)."""
    counts = np.asarray(expert_tokens, np.float64)
    totals = np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return np.round(counts / totals, 5).tolist()


def read_metrics(run_dir: str) -> list[dict]:
    with paths.open_binary(os.path.join(run_dir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]
