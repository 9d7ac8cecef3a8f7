"""The pipeline's closing report: the numbers before and after adaptation, and where the files are."""

from __future__ import annotations

import json
import os

from pipeline.stages import Paths


def _read(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ppl_rows(base: dict | None, adapted: dict | None, label: str) -> list[tuple[str, float | None, float | None]]:
    lengths = (base or adapted or {}).get("lengths", [])

    def at(result, i):
        return result["ppl"][i] if result and i < len(result["ppl"]) else None
    return [(f"{label} perplexity @ {length} tokens", at(base, i), at(adapted, i)) for i, length in enumerate(lengths)]


def build_report(paths: Paths, stage_log: list[dict]) -> dict:
    before, after = paths.evaluation("base"), paths.evaluation("adapted")
    rows = []
    for lang, label in (("zh", "Chinese (held-out People's Daily)"), ("en", "English (held-out HSK translations)")):
        rows += _ppl_rows(_read(os.path.join(before, f"ppl-{lang}.json")),
                          _read(os.path.join(after, f"ppl-{lang}.json")), label)
    mcq_before, mcq_after = _read(os.path.join(before, "mcq.json")), _read(os.path.join(after, "mcq.json"))
    if mcq_before or mcq_after:
        rows.append(("translation MCQ accuracy (%)", (mcq_before or {}).get("overall"),
                     (mcq_after or {}).get("overall")))
    return {"rows": [{"metric": m, "base": b, "adapted": a} for m, b, a in rows],
            "check": _read(paths.check), "stages": stage_log,
            "files": {"base (HF)": paths.base_hf, "base (Orbax NF4)": paths.base_nf4,
                      "pre-training run": paths.pretrain, "SFT run": paths.sft, "release (HF)": paths.release,
                      "evaluations": os.path.dirname(before)}}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:,.2f}"


def markdown(report: dict) -> str:
    lines = ["| metric | base | adapted |", "|---|---:|---:|"]
    lines += [f"| {r['metric']} | {_fmt(r['base'])} | {_fmt(r['adapted'])} |" for r in report["rows"]]
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
