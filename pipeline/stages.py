"""The stages of `mixtral-jax pipeline`, from an HF base directory to a released, checked HF model.

Each stage is one documented `mixtral-jax` command, run as its own process (printed before it runs, so any
stage can be rerun by hand; each starts with the accelerator's memory free), or a check run in this process.
A stage that finishes leaves a marker (`.done/NAME.json`, with its seconds); a later run skips every marked
stage, and a training stage that was killed resumes from its own checkpoints. Stage outputs are written
whole and renamed, so a kill never leaves a half-written one behind; a stage's process dies with the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

from mixtral_jax.io.output_dir import write_json
from pipeline.config import EMBEDDED, PipelineConfig
from pipeline.errors import PipelineError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    purpose: str
    run: Callable[[], None]


def run_command(argv: list[str]) -> None:
    """`mixtral-jax ARGV` as a child process, echoed first; a non-zero exit is a PipelineError."""
    line = "mixtral-jax " + shlex.join(argv)
    print(f"$ {line}", file=sys.stderr, flush=True)
    code = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", *argv], preexec_fn=_die_with_parent).returncode
    if code:
        raise PipelineError(f"`{line}` exited with status {code}")


def _die_with_parent() -> None:
    """In the stage's process before it starts: on Linux, the kernel kills it when the pipeline dies (a
    SIGKILLed pipeline must not leave a training stage running that holds its run directory's lock)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Paths:
    """Where each stage writes, under the work directory."""

    def __init__(self, config: PipelineConfig):
        work = os.path.abspath(config.work_dir)
        self.work = work
        self.inputs = os.path.join(work, "inputs")
        self.english = os.path.join(work, "english")
        self.base_hf = os.path.join(work, "base-hf") if config.base == EMBEDDED else os.path.abspath(config.base)
        self.base_nf4 = os.path.join(work, "base-nf4")
        self.pretrain = os.path.join(work, "pretrain")
        self.sft = os.path.join(work, "sft")
        self.release = os.path.join(work, "release")
        self.data = os.path.join(work, "data")
        self.check = os.path.join(work, "check.json")
        self.markers = os.path.join(work, ".done")

    def evaluation(self, model: str) -> str:
        return os.path.join(self.work, "eval", model)


def evaluation_commands(config: PipelineConfig, paths: Paths, model: str, out: str) -> list[list[str]]:
    """Perplexity by context length on held-out Chinese and English, and the translation MCQ."""
    lengths = ",".join(map(str, config.eval.lengths))
    commands = [["eval", "ppl", "--model", model, "--text", os.path.join(paths.inputs, f"{lang}-heldout.txt"),
                 "--lines", "--lengths", lengths, "--max-windows", str(config.eval.max_windows), "--quiet",
                 "--out", os.path.join(out, f"ppl-{lang}.json"), "--plot", os.path.join(out, f"ppl-{lang}.png")]
                for lang in ("zh", "en")]
    if config.eval.mcq_questions:
        commands.append(["eval", "mcq", "--model", model, "--data", os.path.join(paths.inputs, "mcq"),
                         "--shots", str(config.eval.shots), "--quiet", "--out", os.path.join(out, "mcq.json")])
    return commands


def _stores(paths: Paths, name: str, stage) -> dict[str, str]:
    """role (train, eval, replay) -> the prepared store of a training stage's sources, for each role it has."""
    return {role: os.path.join(paths.data, f"{name}-{role}") for role in ("train", "eval", "replay")
            if getattr(stage.data, role)}


def prepare_commands(paths: Paths, name: str, stage) -> list[list[str]]:
    """`data prepare` of each of the stage's source lists, with the base's tokenizer."""
    kind = "pretrain" if name == "pretrain" else "sft"
    return [["data", "prepare", *getattr(stage.data, role), "--out", out, "--kind",
             "pretrain" if role == "replay" else kind, "--seq-len", str(stage.data.seq_len), "--model", paths.base_hf]
            for role, out in _stores(paths, name, stage).items()]


def train_command(paths: Paths, name: str, stage, base: str, run_dir: str) -> list[str]:
    stores = _stores(paths, name, stage)
    return ["train", stage.config, f"model.path={base}", f"run_dir={run_dir}", f"data.seq_len={stage.data.seq_len}",
            *(f"data.{role}=[{stores.get(role, '')}]" for role in ("train", "eval", "replay")), *stage.overrides]


def build_stages(config: PipelineConfig, paths: Paths) -> list[Stage]:
    from pipeline.check import check_release
    from pipeline.inputs import write_inputs

    def commands(*argvs):
        return lambda: [run_command(argv) for argv in argvs]

    stages = [Stage("inputs", "held-out texts and the translation MCQ from the bundled corpora",
                    lambda: write_inputs(paths.inputs, config.eval.mcq_questions, config.eval.shots))]
    if config.base == EMBEDDED:
        stages += [
            Stage("english", "the bundled tiny model learns English (full training)",
                  commands(["train", "english_tiny", f"run_dir={paths.english}", f"steps={config.english.steps}",
                            *config.english.overrides])),
            Stage("base-hf", "the English-trained model as the HF base",
                  commands(["convert", "orbax-to-hf", paths.english, paths.base_hf, "--overwrite", "--quiet"]))]
    stages += [
        Stage("base-nf4", "HF -> Orbax with the base quantised to NF4",
              commands(["convert", "hf-to-orbax", paths.base_hf, paths.base_nf4, "--quantize", "nf4",
                        "--overwrite", "--quiet"])),
        Stage("eval-base", "the base before adaptation",
              commands(*evaluation_commands(config, paths, paths.base_hf, paths.evaluation("base")))),
        Stage("data", "the training stages' sources tokenised once into prepared stores",
              commands(*prepare_commands(paths, "pretrain", config.pretrain),
                       *prepare_commands(paths, "sft", config.sft))),
        Stage("pretrain", "QLoRA continued pre-training on Chinese",
              commands(train_command(paths, "pretrain", config.pretrain, paths.base_nf4, paths.pretrain))),
        Stage("eval-pretrained", "the model after pre-training on Chinese",
              commands(*evaluation_commands(config, paths, paths.pretrain, paths.evaluation("pretrained")))),
        Stage("sft", "instruction tuning (adapters of pre-training merged, new ones trained)",
              commands(train_command(paths, "sft", config.sft, paths.pretrain, paths.sft))),
        Stage("eval-adapted", "the adapted model",
              commands(*evaluation_commands(config, paths, paths.sft, paths.evaluation("adapted")))),
        Stage("release", "LoRA merged onto the full-precision base, written as an HF directory",
              commands(["convert", "orbax-to-hf", paths.sft, paths.release, "--merge", "--base", paths.base_hf,
                        "--dtype", config.export_dtype, "--overwrite", "--quiet"])),
        Stage("check", "transformers loads the release; its logits against ours",
              lambda: check_release(paths.release, paths.check, config.check_atol)),
    ]
    return stages


def run_stages(stages: list[Stage], paths: Paths) -> list[dict]:
    """Runs every stage without a marker, in order; returns what happened to each."""
    os.makedirs(paths.markers, exist_ok=True)
    log = []
    for number, stage in enumerate(stages, 1):
        marker = os.path.join(paths.markers, f"{stage.name}.json")
        header = f"[{number}/{len(stages)}] {stage.name}: {stage.purpose}"
        if os.path.isfile(marker):
            print(f"{header} (done before, skipped)", file=sys.stderr, flush=True)
            log.append({"stage": stage.name, "skipped": True})
            continue
        print(header, file=sys.stderr, flush=True)
        start = time.perf_counter()
        stage.run()
        record = {"stage": stage.name, "skipped": False, "seconds": round(time.perf_counter() - start, 1)}
        write_json(marker, record)
        log.append(record)
    return log
