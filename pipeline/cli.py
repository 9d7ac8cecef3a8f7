"""`mixtral-jax pipeline`: the whole adaptation in one command (see pipeline/stages.py)."""

from __future__ import annotations

import argparse
import os

from mixtral_jax.settings import add_settings_arguments


def register(commands) -> None:
    p = commands.add_parser(
        "pipeline", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the whole adaptation: HF base -> NF4 -> QLoRA pre-training -> SFT -> evaluation -> merged HF release",
        description="Runs the stages of the adaptation in order, each a documented mixtral-jax command printed "
                    "before it runs; a finished stage is skipped when the pipeline runs again, a killed training "
                    "stage resumes. Prints a report (perplexity before and after on Chinese and English, the "
                    "translation MCQ, the transformers check, where the files are) and writes it as report.json "
                    "and report.md in the work directory. Every key: --keys.")
    add_settings_arguments(p, "default", "work_dir=runs/x english.steps=50")
    p.set_defaults(run=run)


def run(args) -> int:
    from mixtral_jax.io.output_dir import write_json
    from mixtral_jax.io.paths import write_text
    from mixtral_jax.settings import config_and_overrides, keys_text
    from pipeline.config import PipelineConfig, load_config
    from pipeline.report import build_report, markdown
    from pipeline.stages import Paths, build_stages, run_stages

    if args.keys:
        print(keys_text(PipelineConfig))
        return 0
    config = load_config(*config_and_overrides(args.config, args.overrides, "default"))
    paths = Paths(config)
    log = run_stages(build_stages(config, paths), paths)
    report = build_report(paths, log)
    table = markdown(report)
    write_json(os.path.join(paths.work, "report.json"), report)
    write_text(os.path.join(paths.work, "report.md"), table if table.endswith("\n") else table + "\n")
    print(table)
    return 0
