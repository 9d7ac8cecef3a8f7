"""The run's metrics: one JSON object per logged step in `metrics.jsonl`, the same scalars as TensorBoard
events, and a progress bar on the console. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsLog:
    def __init__(self, run_dir: str, resume_step: int, enabled: bool = True):
        """Rows past `resume_step` (steps after the last checkpoint of an interrupted run) are dropped, so the
        file reads as one uninterrupted run."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._file = self._writer = None
        if not enabled:
            return
        kept = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        self._file.flush()
        step = row["step"]
        for name, value in row.items():
            if name == "expert_share":
                for layer, shares in enumerate(value):
                    self._writer.add_scalars(f"experts/layer_{layer}",
                                             {f"expert_{e}": s for e, s in enumerate(shares)}, step)
            elif name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._writer.close()


def expert_share(expert_tokens: np.ndarray) -> list[list[float]]:
    """[L, E] assignment counts -> each layer's share of assignments per expert (rows sum to 1)."""
    counts = np.asarray(expert_tokens, np.float64)
    totals = np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    return np.round(counts / totals, 5).tolist()


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
