"""Prepared data stores: `data prepare`'s throughput over cores, and what a store costs the trainer's start.

    python -m bench.bench_data [--corpus-mb 500] [--pairs 3] [--store-tokens 2.5e8,1e9] [--start-repeats 3]
                               [--host-cores 208] [--work-dir /tmp/bench-data] [--json OUT] [--keep]

1. Prepare: a corpus of `--corpus-mb` MB (the bundled People's Daily sentences repeated; written once to
   WORK_DIR and reused) through the real CLI, `mixtral-jax data prepare FILE --out DIR --workers N --seq-len
   1024`, each run a whole process under `/usr/bin/time -v`, 1 and 2 workers alternated `--pairs` times (a
   drifting load hits both alike). MB/s counts the corpus file's bytes over the process's wall time (the CLI's
   own figure, which leaves out its start, is kept beside it); the 2/1 ratio is taken per adjacent pair.
2. Trainer start: `mixtral-jax train pretrain_tiny ... steps=2 data.seq_len=1024 batch_size=8 log_every=1` on
   synthetic stores (random ids written with StoreWriter, the Mixtral tokenizer's identity in the manifest,
   so the trainer accepts them) of `--store-tokens` tokens, on a 2-batch store (everything but the data's
   size), and on the raw bundled source that the trainer tokenises itself. `start` is the time from launching
   the command to the first row of RUN_DIR/metrics.jsonl, which the trainer writes and flushes right after
   step 1 (imports, JAX, tokenizer, model, data, compiling the step, step 1); `data ready` is the time to the
   trainer's `data: ...` log line (model built, data opened, before compiling). "Model load only" is a
   process that builds the same run's tokenizer and model and exits: the model's own load time.
3. A projection for the paper's corpus on a TPU v5p host: hours to prepare it at the measured per-worker rate
   x `--host-cores` x the 1->2 worker efficiency (capped by the measured rate of prepare's parent process,
   which reads and hands out every chunk alone), and the per-start cost before (tokenising in the trainer at
   the 1-worker rate) and after (a store's measured data-ready cost over the model load).

The corpus stays in WORK_DIR for the next run; the stores, outputs and run directories are deleted unless
`--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from bench.bench_convert import timed

SEQ_LEN = 1024
TRAINER_TOKENISE_MB_S = 8.6  # the trainer's own in-process tokenisation, measured before (shared/DESIGN.md)
PAPER_CORPUS_GB = 20  # the paper's Chinese corpus (~8B Mixtral tokens)
# A TPU v5p VM (4 chips) has 208 vCPUs, half of them usable with NUMA binding:
# https://cloud.google.com/tpu/docs/v5p, "VM, host and slice properties".
V5P_HOST_VCPUS = 208
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results-data-cpu.json")
MODEL_LOAD = """
import sys
from mixtral_jax.checkpoints import pretrained, run_manifest
from mixtral_jax.data.tokenizer import load_tokenizer
from mixtral_jax.parallel.distributed import initialize
from mixtral_jax.parallel.sharding import make_mesh
from train.config import load_config
from train.loop import run_model_of
config = load_config("pretrain_tiny", sys.argv[1:])
initialize()
mesh = make_mesh(config.mesh)
load_tokenizer(config.model.tokenizer, model=run_manifest.model_directory(config.model.path))
pretrained.build_model(run_model_of(config), mesh)
print("model built", file=sys.stderr, flush=True)
"""


def cli() -> list[str]:
    """The installed console script beside this interpreter (what a user runs), else the module."""
    script = os.path.join(os.path.dirname(sys.executable), "mixtral-jax")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "mixtral_jax.cli"]


def write_corpus(work: str, megabytes: float) -> str:
    """WORK/corpus-<MB>mb.txt: the bundled sentences, one a line, repeated to at least `megabytes` MB; an
    existing one is reused (it is renamed into place only once complete)."""
    from mixtral_jax.data.corpora import peoples_daily

    path = os.path.join(work, f"corpus-{megabytes:g}mb.txt")
    if os.path.isfile(path):
        return path
    one_pass = ("\n".join(peoples_daily("all")) + "\n").encode("utf-8")
    passes = -(-int(megabytes * 1e6) // len(one_pass))
    os.makedirs(work, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        for _ in range(passes):
            f.write(one_pass)
    os.replace(path + ".tmp", path)
    return path


def prepare_once(corpus: str, out: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run = timed([*cli(), "data", "prepare", corpus, "--out", out, "--workers", str(workers), "--seq-len",
                 str(SEQ_LEN)])
    if run["returncode"] != 0:
        raise RuntimeError(f"data prepare failed: {run['stdout_tail']}")
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        tokens = json.load(f)["counts"]["tokens"]
    shutil.rmtree(out)
    own = re.search(r"\(([\d,.]+) MB/s", run["stdout_tail"])
    mb = os.path.getsize(corpus) / 1e6
    return {"workers": workers, "seconds": run["seconds"], "mb_per_s": mb / run["seconds"],
            "tokens": tokens, "tokens_per_s": tokens / run["seconds"],
            "cli_mb_per_s": float(own.group(1).replace(",", "")) if own else None,
            "peak_rss_mb": run["peak_rss_mb"], "peak_tree_rss_mb": run["peak_tree_rss_mb"]}


def parent_ceiling(corpus: str) -> float:
    """MB/s of prepare's parent alone with workers > 1, tokenising nothing: find the lines, cut the tasks and
    pickle them for the pool, as prepare.py does. Taking back and writing the blocks is left out, so this is an
    upper bound on any number of workers."""
    from mixtral_jax.data import text_pieces
    from mixtral_jax.data.prepare import LINE_CHUNKS_PER_TASK

    start = time.perf_counter()
    for task in text_pieces.tasks([corpus], "text", 1000 * LINE_CHUNKS_PER_TASK):
        pickle.dumps(task)
    return os.path.getsize(corpus) / 1e6 / (time.perf_counter() - start)


def summarise_prepare(runs: list[dict]) -> dict:
    by = {n: [r for r in runs if r["workers"] == n] for n in (1, 2)}
    rows = {}
    for n, group in by.items():
        rates = [r["mb_per_s"] for r in group]
        rows[n] = {"workers": n, "mb_per_s": statistics.median(rates), "mb_per_s_range": [min(rates), max(rates)],
                   "tokens_per_s": statistics.median(r["tokens_per_s"] for r in group),
                   "cli_mb_per_s": statistics.median(r["cli_mb_per_s"] or 0 for r in group),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in group),
                   "peak_tree_rss_mb": max(r["peak_tree_rss_mb"] for r in group)}
    ratios = [two["mb_per_s"] / one["mb_per_s"] for one, two in zip(by[1], by[2])]
    return {"rows": [rows[1], rows[2]], "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


def write_store(directory: str, tokens: int, seed: int = 0) -> int:
    """A pretrain store of random ids, `tokens` rounded down to whole blocks, that fits a Mixtral-tokenizer
    run; one left by an earlier --keep run with the same size is reused. Returns its tokens."""
    from mixtral_jax.data import store
    from mixtral_jax.data.tokenizer import identity, load_tokenizer

    rows = tokens // SEQ_LEN
    if store.is_store(directory) and store.read_manifest(directory)["counts"]["sequences"] == rows:
        return rows * SEQ_LEN
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    tokenizer = load_tokenizer(None)
    writer = store.StoreWriter(directory, "pretrain", SEQ_LEN)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 1 << 14):  # 64 MB at a time
        count = min(1 << 14, rows - start)
        writer.add_blocks(rng.integers(3, tokenizer.vocab_size, (count, SEQ_LEN), dtype=np.int32))
    writer.finish(tokenizer={"path": tokenizer.path, **identity(tokenizer)},
                  rules={"recipe": "random ids (bench/bench_data.py)"}, sources=[],
                  counts={"dropped": 0, "text_bytes": 0})
    return rows * SEQ_LEN


def timed_start(argv: list[str], metrics: str | None = None, marker: str = "data: ") -> dict:
    """Seconds from launch to the first stderr line that starts with `marker` (the trainer's `data:` log line),
    to the first row of `metrics`, and to the end, with GNU time's peak RSS."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - start, line) for line in proc.stderr))
    reader.start()
    first_row = None
    while proc.poll() is None:
        if first_row is None and metrics and os.path.isfile(metrics):
            with open(metrics, encoding="utf-8") as f:
                if f.readline().endswith("\n"):
                    first_row = time.perf_counter() - start
        time.sleep(0.02)
    wall = time.perf_counter() - start
    reader.join()
    stderr = "".join(line for _, line in lines)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if proc.returncode != 0 or rss is None:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr[-3000:]}")
    ready = next((t for t, line in lines if line.startswith(marker)), None)
    return {"start_s": first_row or wall, "ready_s": ready, "wall_s": wall, "peak_rss_mb": int(rss.group(1)) / 1024}


def train_overrides(run_dir: str, source: str) -> list[str]:
    return [f"run_dir={run_dir}", "steps=2", f"data.train=[{source}]", "data.eval=[]", f"data.seq_len={SEQ_LEN}",
            "batch_size=8", "log_every=1", "save_every=1000", "progress=false"]


def start_runs(sources: dict[str, str], work: str, repeats: int) -> list[dict]:
    """Each repeat runs the model-load reference and then every source once, each with a fresh run_dir, after
    one untimed model load (the first process after others pays for reading the files that they evicted)."""
    run_dir = os.path.join(work, "run")
    model_load = [sys.executable, "-c", MODEL_LOAD, *train_overrides(run_dir, "unused")]
    timed_start(model_load)
    runs = []
    for i in range(repeats):
        print(f"trainer starts: repeat {i + 1} of {repeats} ...", file=sys.stderr)
        runs.append({"name": "model load only", **timed_start(model_load, marker="model built")})
        for name, source in sources.items():
            shutil.rmtree(run_dir, ignore_errors=True)
            argv = [*cli(), "train", "pretrain_tiny", *train_overrides(run_dir, source)]
            runs.append({"name": name, **timed_start(argv, os.path.join(run_dir, "metrics.jsonl"))})
    shutil.rmtree(run_dir, ignore_errors=True)
    return runs


def summarise_starts(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["name"] for r in runs):
        group = [r for r in runs if r["name"] == name]
        starts = [r["start_s"] for r in group]
        ready = [r["ready_s"] for r in group if r["ready_s"] is not None]
        rows.append({"name": name, "start_s": statistics.median(starts), "start_s_range": [min(starts), max(starts)],
                     "ready_s": statistics.median(ready) if ready else None,
                     "wall_s": statistics.median(r["wall_s"] for r in group),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in group)})
    return rows


def projection(prepare: dict, starts: list[dict], ceiling: float, cores: int, largest: str) -> dict:
    """The paper's corpus on one host of `cores` cores, from this machine's figures."""
    one = prepare["rows"][0]["mb_per_s"]
    efficiency = prepare["ratio"] / 2
    host_rate = min(one * cores * efficiency, ceiling)
    by_name = {r["name"]: r for r in starts}
    load = by_name["model load only"]["ready_s"]
    megabytes = PAPER_CORPUS_GB * 1e3
    return {"corpus_gb": PAPER_CORPUS_GB, "host_cores": cores, "per_worker_mb_per_s": one,
            "efficiency_per_core": efficiency, "parent_ceiling_mb_per_s": ceiling, "host_mb_per_s": host_rate,
            "limited_by": "parent" if host_rate == ceiling else "workers",
            "prepare_hours": megabytes / host_rate / 3600,
            "start_before_minutes": megabytes / one / 60,
            "start_before_minutes_at_8_6": megabytes / TRAINER_TOKENISE_MB_S / 60,
            "start_after_data_s": by_name[largest]["ready_s"] - load,
            "start_after_s": by_name[largest]["start_s"],
            "start_over_minimal_store_s": by_name[largest]["start_s"] - by_name["store, 2 batches"]["start_s"]}


def report(results: dict) -> None:
    prepare, proj = results["prepare"], results["projection"]
    print(f"\nprepare: {results['corpus_mb']:.0f} MB corpus, seq_len {SEQ_LEN}, {results['pairs']} pairs alternated; "
          f"load average {results['loadavg_before'][0]:.2f} before, {results['loadavg_after'][0]:.2f} after")
    print("| workers | MB/s (whole process) | tokens/s | MB/s (CLI's own) | peak RSS MB, largest process | all |\n"
          "|---:|---:|---:|---:|---:|---:|")
    for r in prepare["rows"]:
        print(f"| {r['workers']} | {r['mb_per_s']:.2f} [{r['mb_per_s_range'][0]:.2f}-{r['mb_per_s_range'][1]:.2f}] "
              f"| {r['tokens_per_s']:,.0f} | {r['cli_mb_per_s']:.2f} | {r['peak_rss_mb']:,.0f} "
              f"| {r['peak_tree_rss_mb']:,.0f} |")
    one = prepare["rows"][0]["mb_per_s"]
    print(f"2 / 1 workers: {prepare['ratio']:.2f}x [{prepare['ratio_range'][0]:.2f}-{prepare['ratio_range'][1]:.2f}] "
          f"(aim >= 1.7x: {'met' if prepare['ratio'] >= 1.7 else 'NOT met'}); 1 worker {one:.2f} MB/s (aim >= "
          f"{TRAINER_TOKENISE_MB_S}: {'met' if one >= TRAINER_TOKENISE_MB_S else 'NOT met'}); parent alone "
          f"{results['parent_ceiling_mb_per_s']:.0f} MB/s")
    print(f"\ntrainer start (pretrain_tiny, seq_len {SEQ_LEN}, batch 8, steps=2), {results['start_repeats']} repeats: "
          "medians [range]; start: launch to the first metrics row (step 1 done); ready: launch to the trainer's "
          "`data:` line (model built, data opened), for the reference to its model built")
    print("| data | start s | ready s | whole run s | peak RSS MB |\n|---|---:|---:|---:|---:|")
    for r in results["starts"]:
        ready = f"{r['ready_s']:.1f}" if r["ready_s"] is not None else "-"
        print(f"| {r['name']} | {r['start_s']:.1f} [{r['start_s_range'][0]:.1f}-{r['start_s_range'][1]:.1f}] | "
              f"{ready} | {r['wall_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    aims = results["aims"]
    print(f"largest store: data ready {proj['start_after_data_s']:.1f} s after the model load alone (aim <= 10: "
          f"{'met' if aims['start_met'] else 'NOT met'}), start {proj['start_over_minimal_store_s']:+.1f} s against "
          f"the 2-batch store; peak RSS spread over the store sizes: "
          f"{aims['rss_spread_mb']:.0f} MB (aim <= 200: {'met' if aims['rss_met'] else 'NOT met'})")
    print(f"\nprojection, the paper's {proj['corpus_gb']} GB corpus on one host of {proj['host_cores']} cores: "
          f"{proj['per_worker_mb_per_s']:.2f} MB/s a worker x {proj['host_cores']} x {proj['efficiency_per_core']:.2f}"
          f" efficiency, at most the parent's {proj['parent_ceiling_mb_per_s']:.0f} MB/s = "
          f"{proj['host_mb_per_s']:.0f} MB/s (limited by the {proj['limited_by']}): {proj['prepare_hours']:.2f} h "
          f"once; each start before: {proj['start_before_minutes']:.0f} min of tokenising per host (at "
          f"{TRAINER_TOKENISE_MB_S} MB/s: {proj['start_before_minutes_at_8_6']:.0f} min); after: "
          f"{proj['start_after_data_s']:.1f} s of data over the model load ({proj['start_after_s']:.1f} s to step 1 "
          "for the tiny model)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=500, help="size of the text corpus prepared")
    parser.add_argument("--pairs", type=int, default=3, help="(1 worker, 2 workers) prepare runs, alternated")
    parser.add_argument("--store-tokens", default="2.5e8,1e9", help="synthetic store sizes in tokens, comma-separated")
    parser.add_argument("--start-repeats", type=int, default=3, help="runs of every trainer start")
    parser.add_argument("--host-cores", type=int, default=V5P_HOST_VCPUS,
                        help="cores of the projected host (a TPU v5p VM's vCPUs)")
    parser.add_argument("--work-dir", default="/tmp/bench-data", help="corpus (kept), stores and outputs")
    parser.add_argument("--json", default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg(), "pairs": args.pairs,
               "start_repeats": args.start_repeats}
    print(f"corpus of {args.corpus_mb:g} MB in {args.work_dir} ...", file=sys.stderr)
    corpus = write_corpus(args.work_dir, args.corpus_mb)
    results["corpus_mb"] = os.path.getsize(corpus) / 1e6
    runs = []
    for i in range(args.pairs):
        for workers in (1, 2):
            print(f"prepare: pair {i + 1} of {args.pairs}, {workers} worker(s) ...", file=sys.stderr)
            runs.append(prepare_once(corpus, os.path.join(args.work_dir, "prepared"), workers))
    results.update(prepare=summarise_prepare(runs), prepare_runs=runs, parent_ceiling_mb_per_s=parent_ceiling(corpus))

    sizes = [int(float(s)) for s in args.store_tokens.split(",")]
    stores = {}
    for tokens in [16 * SEQ_LEN, *sizes]:
        print(f"store of {tokens:,} tokens ...", file=sys.stderr)
        path = os.path.join(args.work_dir, f"store-{tokens}")
        written = write_store(path, tokens)
        stores["store, 2 batches" if tokens == 16 * SEQ_LEN else f"store, {written / 1e6:,.0f}M tokens"] = path
    names = list(stores)
    starts = start_runs({**stores, "raw bundled:peoples-daily": "bundled:peoples-daily"}, args.work_dir,
                        args.start_repeats)
    results.update(starts=summarise_starts(starts), start_runs=starts, store_tokens=sizes,
                   loadavg_after=os.getloadavg())
    results["projection"] = projection(results["prepare"], results["starts"], results["parent_ceiling_mb_per_s"],
                                       args.host_cores, names[-1])
    rss = [r["peak_rss_mb"] for r in results["starts"] if r["name"] in names[1:]]
    results["aims"] = {"ratio_met": results["prepare"]["ratio"] >= 1.7,
                       "one_worker_met": results["prepare"]["rows"][0]["mb_per_s"] >= TRAINER_TOKENISE_MB_S,
                       "start_met": results["projection"]["start_after_data_s"] <= 10,
                       "rss_spread_mb": max(rss) - min(rss), "rss_met": max(rss) - min(rss) <= 200}
    report(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    if not args.keep:
        for path in stores.values():
            shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
