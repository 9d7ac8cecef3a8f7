"""The whole adaptation as one command: its inputs, its config, skipping finished stages, and a real run on
the embedded default (reduced steps) that is killed in the middle and then finishes without redoing stages."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mixtral_jax.data.corpora import hsk_instructions, hsk_pairs
from mixtral_jax.errors import ConfigError
from pipeline.config import load_config
from pipeline.inputs import MCQ_SUBJECT, write_inputs
from pipeline.stages import Paths, Stage, run_stages

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = ["english.steps=12", "english.overrides=[progress=false, eval_every=0, save_every=6]",
         "pretrain.overrides=[steps=6, save_every=3, eval_every=0, progress=false]",
         "sft.overrides=[steps=4, save_every=4, eval_every=0, progress=false]",
         "eval.lengths=[64, 128]", "eval.max_windows=2", "eval.mcq_questions=8", "eval.shots=2"]


def test_inputs_mcq_asks_for_the_translation_of_held_out_sentences(tmp_path):
    files = write_inputs(str(tmp_path / "inputs"), mcq_questions=12, shots=3)
    english = dict(hsk_pairs("heldout"))
    with open(os.path.join(files["mcq"], "val", f"{MCQ_SUBJECT}_val.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["answer"] for r in rows} <= set("ABCD")
    for row in rows:
        chinese = row["question"].removeprefix("“").removesuffix("”的英文翻译是")
        assert row[row["answer"]] == english[chinese]  # the keyed option is the translation
        assert len({row[letter] for letter in "ABCD"}) == 4
    with open(os.path.join(files["mcq"], "dev", f"{MCQ_SUBJECT}_dev.csv"), encoding="utf-8") as f:
        dev = list(csv.DictReader(f))
    train_chinese = {zh for zh, _ in hsk_pairs("train")}
    assert len(dev) == 3 and all(r["question"][1:-7] in train_chinese for r in dev)
    assert not train_chinese & set(english)
    assert len(hsk_pairs("heldout")) == len(hsk_instructions("heldout"))
    with open(files["en"], encoding="utf-8") as f:
        assert f.read().count("\n") > 200


def test_config_default_and_errors(tmp_path):
    config = load_config("default", ["english.steps=5", "eval.lengths=[64, 128]"])
    assert config.base == "embedded" and config.english.steps == 5 and config.eval.lengths == (64, 128)
    assert config.pretrain.config == "pretrain_tiny" and config.sft.config == "sft_tiny"
    with pytest.raises(ConfigError, match="unknown key 'eval.lenghts'"):
        load_config("default", ["eval.lenghts=[1]"])
    with pytest.raises(ConfigError, match="key 'english.steps' must be >= 1"):
        load_config("default", ["english.steps=0"])


def test_finished_stages_are_skipped_and_a_failure_leaves_no_marker(tmp_path):
    paths = Paths(load_config("default", [f"work_dir={tmp_path}"]))
    ran = []

    def fail():
        raise RuntimeError("stage broke")
    stages = [Stage("a", "first", lambda: ran.append("a")), Stage("b", "second", fail)]
    with pytest.raises(RuntimeError, match="stage broke"):
        run_stages(stages, paths)
    assert ran == ["a"] and os.listdir(paths.markers) == ["a.json"]
    stages[1] = Stage("b", "second", lambda: ran.append("b"))
    log = run_stages(stages, paths)
    assert ran == ["a", "b"] and [entry["skipped"] for entry in log] == [True, False]


def _pipeline(work_dir, *extra):
    return [sys.executable, "-m", "mixtral_jax.cli", "pipeline", f"work_dir={work_dir}", *QUICK, *extra]


@pytest.mark.slow
def test_pipeline_killed_in_the_middle_then_finishes_without_redoing_stages(tmp_path):
    work = tmp_path / "pipeline"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(_pipeline(work), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    marker = work / ".done" / "data.json"
    deadline = time.time() + 600
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGKILL)  # in the middle: pre-training has started
    process.wait()
    done_before = {p.stem: p.stat().st_mtime_ns for p in (work / ".done").iterdir()}
    assert set(done_before) == {"inputs", "english", "base-hf", "base-nf4", "eval-base", "data"}

    finished = subprocess.run(_pipeline(work), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for stage, mtime in done_before.items():
        assert (work / ".done" / f"{stage}.json").stat().st_mtime_ns == mtime
        assert f"{stage}: " in finished.stderr and "(done before, skipped)" in finished.stderr
    assert "$ mixtral-jax train english_tiny" not in finished.stderr
    assert f"data.train=[{work / 'data' / 'pretrain-train'}]" in finished.stderr  # trained on the prepared stores
    report = json.loads((work / "report.json").read_text())
    assert [s["stage"] for s in report["stages"] if not s["skipped"]] == ["pretrain", "eval-pretrained", "sft",
                                                                       "eval-adapted", "release", "check"]
    metrics = {row["metric"]: row for row in report["rows"]}
    zh = metrics["Chinese (held-out People's Daily) perplexity @ 128 tokens"]
    en = metrics["English (held-out HSK translations) perplexity @ 128 tokens"]
    assert zh["pretrained"] < zh["base"] and zh["adapted"] < zh["base"]  # a few steps of Chinese already help
    assert 1 < en["base"] < 32000 and 1 < en["pretrained"] and 1 < en["adapted"]
    assert 0 <= metrics["translation MCQ accuracy (%)"]["adapted"] <= 100
    assert report["check"]["passed"] and report["check"]["max_abs_logit_difference"] <= 1e-4
    assert (work / "release" / "config.json").exists() and (work / "report.md").exists()
    assert "| metric | base | after pre-training | after SFT |" in finished.stdout
