"""The converters at Mixtral-8x7B's real layer widths: throughput and peak memory against a plain `cp`.

    python -m bench.bench_convert [--layers 2] [--repeats 3] [--nf4] [--dir /tmp/bench-convert] [--json OUT] [--keep]

Writes a synthetic HF checkpoint (legacy per-expert layout, bf16, two shards) with Mixtral-8x7B's widths
(hidden 4096, intermediate 14336, 8 experts, 32 heads, 8 kv heads, vocab 32000) and `--layers` layers
(2: ~6.2 GB), then times, each in its own process under `/usr/bin/time -v`: `cp -r` of that directory,
`cp -r` followed by `sync` (the durable copy: the converters sync every file they write before publishing
the output, `cp` leaves dirty pages behind), `mixtral-jax convert hf-to-orbax`, `mixtral-jax convert
orbax-to-hf` and `mixtral-jax convert verify` of the round trip (and with `--nf4` `hf-to-orbax --quantize
nf4`), each from the same state (`settle`), `--repeats` times. Reports, per step, the median seconds and
their range, GB/s of checkpoint bytes, the ratio to the rate of `cp` in the same run (median and range: the
disk's speed changes from run to run), and peak RSS: GNU time's (the largest single process) and the peak of
the sum over the command's processes (should a step start any).
Every layer of the real model has the same tensors, so the peak memory measured here is the real model's;
time scales with the bytes (the README extrapolates to 93 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np

from mixtral_jax.checkpoints.name_map import legacy_mappings
from mixtral_jax.config import MixtralConfig
from mixtral_jax.io.safetensors_files import write_safetensors

REAL_WIDTHS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                   num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                   max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None)


def write_synthetic(directory: str, layers: int, seed: int = 0) -> int:
    """A legacy-layout bf16 HF directory, one shard per layer (the first also holds the embedding, the last
    the norm and LM head); returns its tensor bytes."""
    config = MixtralConfig.from_dict({**REAL_WIDTHS, "num_hidden_layers": layers, "dtype": "bfloat16",
                                      "param_dtype": "bfloat16"})
    rng = np.random.default_rng(seed)
    shards: list[list] = [[] for _ in range(layers)]
    for m in legacy_mappings(config):
        layer = int(m.hf_key.split(".")[2]) if m.hf_key.startswith("model.layers.") else (
            0 if "embed_tokens" in m.hf_key else layers - 1)
        shards[layer].append(m)
    os.makedirs(directory, exist_ok=True)
    weight_map, total = {}, 0
    for i, mappings in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        tensors = [(m.hf_key, (0.02 * rng.standard_normal(m.hf_shape, np.float32)).astype(ml_dtypes.bfloat16))
                   for m in mappings]
        write_safetensors(os.path.join(directory, name), tensors)
        for key, array in tensors:
            weight_map[key] = name
            total += array.nbytes
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config.to_hf(), "torch_dtype": "bfloat16"}, f, indent=2)
    return total


def settle(*inputs: str) -> bool:
    """The same start for every step: dirty pages written out, the page cache emptied (where this user may:
    root), then the step's inputs read once, so that they are cached and the rest of memory is free. Without
    this, a step's writes pay for evicting the earlier steps' files, and the order of the steps decides the
    figures. Returns whether the cache could be dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        dropped = True
    except OSError:
        dropped = False
    for directory in inputs:
        for root, _, files in os.walk(directory):
            for name in files:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while f.read(64 << 20):
                        pass
    return dropped


def timed(argv: list[str]) -> dict:
    """Wall seconds and peak RSS of one command: GNU time's (the largest single process) and, sampled every
    20 ms, the peak of the RSS summed over its process tree (any child processes together)."""
    import psutil

    proc = subprocess.Popen(["/usr/bin/time", "-v", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    tree_peak = 0

    def sample():
        nonlocal tree_peak
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:  # a process ended while it was looked at
                continue
            tree_peak = max(tree_peak, total)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode not in (0, 1) or "Maximum resident set size" not in stderr:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    return {"seconds": seconds, "peak_rss_mb": rss_kb / 1024, "peak_tree_rss_mb": tree_peak / 2**20,
            "returncode": proc.returncode, "stdout_tail": stdout[-500:]}


def run_steps(hf: str, work: str, nf4: bool) -> dict[str, dict]:
    """One run of every step, each from the same state (`settle`); the outputs are removed afterwards."""
    copy, orbax, back, quantized = (os.path.join(work, name) for name in ("cp", "orbax", "hf-back", "nf4"))
    cli = [sys.executable, "-m", "mixtral_jax.cli", "convert"]
    settle(hf)
    runs = {"cp": timed(["cp", "-r", hf, copy])}
    settle(hf)
    runs["cp + sync"] = timed(["sh", "-c", f'rm -rf "{copy}" && cp -r "{hf}" "{copy}" && sync'])
    shutil.rmtree(copy)
    settle(hf)
    runs["hf-to-orbax"] = timed([*cli, "hf-to-orbax", hf, orbax, "--quiet"])
    settle(orbax)
    runs["orbax-to-hf"] = timed([*cli, "orbax-to-hf", orbax, back, "--quiet"])
    settle(hf, back)
    runs["verify"] = timed([*cli, "verify", hf, back])
    if runs["verify"]["returncode"] != 0:
        raise RuntimeError(f"the round trip differs:\n{runs['verify']['stdout_tail']}")
    if nf4:
        settle(hf)
        runs["hf-to-orbax --quantize nf4"] = timed([*cli, "hf-to-orbax", hf, quantized, "--quantize", "nf4", "--quiet"])
    for path in (orbax, back, quantized):
        shutil.rmtree(path, ignore_errors=True)
    return runs


def summarise(runs: list[dict[str, dict]], nbytes: int) -> list[dict]:
    """Per step over the runs: median seconds and their range, and the rate against each run's own `cp` and
    `cp` + `sync` (median and range: the disk's speed changes from run to run), peak memory the largest."""
    gb = nbytes / 1e9
    rows = []
    for name in runs[0]:
        seconds = [run[name]["seconds"] for run in runs]
        vs_cp = [run["cp"]["seconds"] / run[name]["seconds"] for run in runs]
        vs_sync = [run["cp + sync"]["seconds"] / run[name]["seconds"] for run in runs]
        rows.append({"step": name, "seconds": float(np.median(seconds)), "seconds_range": [min(seconds), max(seconds)],
                     "gb_per_s": gb / float(np.median(seconds)), "vs_cp": float(np.median(vs_cp)),
                     "vs_cp_range": [min(vs_cp), max(vs_cp)], "vs_cp_sync": float(np.median(vs_sync)),
                     "vs_cp_sync_range": [min(vs_sync), max(vs_sync)],
                     "peak_rss_mb": max(run[name]["peak_rss_mb"] for run in runs),
                     "peak_tree_rss_mb": max(run[name]["peak_tree_rss_mb"] for run in runs)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every step (medians and ranges reported)")
    parser.add_argument("--nf4", action="store_true", help="also time hf-to-orbax --quantize nf4")
    parser.add_argument("--dir", default="/tmp/bench-convert", help="work directory (needs ~4x the checkpoint)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    hf = os.path.join(args.dir, "hf")
    print(f"writing a synthetic {args.layers}-layer checkpoint at Mixtral-8x7B widths ...", file=sys.stderr)
    nbytes = write_synthetic(hf, args.layers)
    dropped = settle(hf)
    runs = []
    for i in range(args.repeats):
        print(f"run {i + 1} of {args.repeats} ...", file=sys.stderr)
        runs.append(run_steps(hf, args.dir, args.nf4))
    rows = summarise(runs, nbytes)
    settled = "dropped before each step, inputs read in" if dropped else "not dropped (needs root)"
    print(f"checkpoint: {args.layers} layers at Mixtral-8x7B widths, bf16, {nbytes / 1e9:.2f} GB; page cache "
          f"{settled}; {args.repeats} runs: medians, [range]")
    print("| step | seconds | GB/s | rate / cp | rate / (cp + sync) | peak RSS MB, largest process | all processes |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']:.1f} [{r['seconds_range'][0]:.1f}-{r['seconds_range'][1]:.1f}] | "
              f"{r['gb_per_s']:.2f} | {r['vs_cp']:.2f} [{r['vs_cp_range'][0]:.2f}-{r['vs_cp_range'][1]:.2f}] | "
              f"{r['vs_cp_sync']:.2f} [{r['vs_cp_sync_range'][0]:.2f}-{r['vs_cp_sync_range'][1]:.2f}] | "
              f"{r['peak_rss_mb']:,.0f} | {r['peak_tree_rss_mb']:,.0f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"layers": args.layers, "bytes": nbytes, "cache_dropped": dropped, "repeats": args.repeats,
                       "rows": rows, "runs": [{name: {k: v for k, v in run.items() if k != "stdout_tail"}
                                               for name, run in r.items()} for r in runs]}, f, indent=2)
            f.write("\n")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
