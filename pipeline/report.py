"""The pipeline's closing report: the numbers before and after adaptation, and where the files are."""

from __future__ import annotations

import os

from mixtral_jax.config import read_json_object
from pipeline.stages import Paths


def _read(path: str) -> dict | None:
    """A stage's JSON result, or None where the stage has not run (yet)."""
    return read_json_object(path) if os.path.isfile(path) else None


MODELS = ("base", "pretrained", "adapted")  # before, after pre-training, after SFT (the release's weights)


def build_report(paths: Paths, stage_log: list[dict]) -> dict:
    results = {model: {name: _read(os.path.join(paths.evaluation(model), f"{name}.json"))
                       for name in ("ppl-zh", "ppl-en", "mcq")} for model in MODELS}
    rows = []
    for lang, label in (("zh", "Chinese (held-out People's Daily)"), ("en", "English (held-out HSK translations)")):
        curves = {model: results[model][f"ppl-{lang}"] for model in MODELS}
        lengths = next((c["lengths"] for c in curves.values() if c), [])
        for i, length in enumerate(lengths):
            rows.append({"metric": f"{label} perplexity @ {length} tokens",
                         **{m: c["ppl"][i] if c and i < len(c["ppl"]) else None for m, c in curves.items()}})
    if any(results[model]["mcq"] for model in MODELS):
        rows.append({"metric": "translation MCQ accuracy (%)",
                     **{m: (results[m]["mcq"] or {}).get("overall") for m in MODELS}})
    return {"rows": rows, "check": _read(paths.check), "stages": stage_log,
            "files": {"base (HF)": paths.base_hf, "base (Orbax NF4)": paths.base_nf4,
                      "pre-training run": paths.pretrain, "SFT run": paths.sft, "release (HF)": paths.release,
                      "evaluations": os.path.dirname(paths.evaluation("base"))}}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,.2f}"


def markdown(report: dict) -> str:
    lines = ["| metric | base | after pre-training | after SFT |", "|---|---:|---:|---:|"]
    lines += [f"| {r['metric']} | " + " | ".join(_fmt(r[m]) for m in MODELS) + " |" for r in report["rows"]]
    check = report["check"] or {}
    if "max_abs_logit_difference" in check:
        verdict = "passed" if check["passed"] else "FAILED"
        lines.append(f"\ntransformers loads the release; largest logit difference to ours "
                     f"{check['max_abs_logit_difference']:.2e} (atol {check['atol']}): {verdict}")
    elif check:
        lines.append(f"\ntransformers check: {check['transformers']}")
    seconds = sum(s.get("seconds", 0) for s in report["stages"])
    skipped = [s["stage"] for s in report["stages"] if s["skipped"]]
    lines.append(f"\nstages run in {seconds:.0f} s" + (f"; done before: {', '.join(skipped)}" if skipped else ""))
    lines += ["", "| output | path |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["files"].items()]
    return "\n".join(lines) + "\n"
