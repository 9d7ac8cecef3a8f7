"""A whole training run, read back from its metrics.jsonl: throughput, MFU and what checkpoints cost.

    python -m bench.bench_run [--steps 60] [--save-every 10] [--json OUT]

Runs the `pretrain_tiny` preset (QLoRA on the bundled tiny model, People's Daily blocks of 128 tokens, batch 8,
one CPU device) twice, with asynchronous and with synchronous checkpoints, logging every step. Reports the
median tokens/s and MFU of the steps after the first (compiling) one, how long the `save` call held the
training loop, and the median time of the steps right after a save against the others: with asynchronous
saving, a stall shows up there as a slower step while the checkpoint is written in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile


def run_once(async_save: bool, steps: int, save_every: int, run_dir: str) -> dict:
    from train.config import load_config
    from train.loop import train
    from train.metrics import read_metrics

    config = load_config("pretrain_tiny", [f"run_dir={run_dir}", f"steps={steps}", "log_every=1",
                                           f"save_every={save_every}", f"async_save={str(async_save).lower()}",
                                           "eval_every=0", "data.eval=[bundled:peoples-daily-heldout]",
                                           "data.eval_rows=8", "progress=false"])
    summary = train(config, log=lambda _: None)
    rows = [r for r in read_metrics(run_dir) if r.get("tokens_per_s")]
    tokens_per_step = config.batch_size * config.data.seq_len
    seconds = {r["step"]: tokens_per_step / r["tokens_per_s"] for r in rows}
    after_save = [s for step, s in seconds.items() if step % save_every == 1 and step > 1]
    others = [s for step, s in seconds.items() if step % save_every != 1]
    return {
        "async_save": async_save, "steps": steps, "save_every": save_every,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "mfu": statistics.median(r["mfu"] for r in rows),
        "step_ms_median": 1e3 * statistics.median(others),
        "step_ms_after_save_median": 1e3 * statistics.median(after_save),
        "save_call_ms_median": 1e3 * statistics.median(summary["checkpoint_start_seconds"]),
        "saves": len(summary["checkpoint_start_seconds"]),
        "checkpoint_mb": _directory_mb(os.path.join(run_dir, "checkpoints", str(steps))),
    }


def _directory_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


def format_table(results: list[dict]) -> str:
    lines = ["| saving | tokens/s | MFU | step ms | step ms after a save | save call ms | checkpoint MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {'async' if r['async_save'] else 'sync'} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% "
                     f"| {r['step_ms_median']:.0f} | {r['step_ms_after_save_median']:.0f} "
                     f"| {r['save_call_ms_median']:.0f} | {r['checkpoint_mb']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for async_save in (True, False):
        with tempfile.TemporaryDirectory() as run_dir:
            print(f"pretrain_tiny, {'async' if async_save else 'sync'} checkpoints ...", file=sys.stderr, flush=True)
            results.append(run_once(async_save, args.steps, args.save_every, run_dir))
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
