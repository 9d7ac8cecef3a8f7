"""The run directory around a training run (issue 19): its lock, what a resume may change and where changes are
recorded, a directory with no checkpoint bound to nothing, and the refusals and warnings that come before any
compile (a batch the mesh does not split, an empty data file, sequences past the model's positions).
End-to-end resumes (a damaged checkpoint, changed keys on a real run) are in test_loop.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mixtral_jax.checkpoints import run_manifest as runs
from mixtral_jax.checkpoints.run_lock import LOCK_FILE, RunDirLocked
from mixtral_jax.data.corpora import peoples_daily
from mixtral_jax.data.texts import DataError
from mixtral_jax.data.tokenizer import load_tokenizer
from mixtral_jax.errors import ConfigError
from train import loop, resume
from train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUIET = ["progress=false", "peak_tflops=0.1", "data.eval=[]"]


def _config(run_dir, *extra, preset="pretrain_tiny"):
    return load_config(preset, [f"run_dir={run_dir}", *QUIET, *extra])


@pytest.fixture
def empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    return str(path)


# --- what a resume may change (train/resume.py) --------------------------------------------------------

def test_a_resume_lists_each_changed_key_old_and_new_and_refuses_what_breaks_it(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    first = _config(run_dir)
    resume.prepare_run_dir(first, loop.run_model_of(first), [], True, print)
    changed = _config(run_dir, "lora.rank=8", "data.seq_len=64", "optimizer.learning_rate=0.001", "save_every=7",
                      "data.eval_rows=4")
    with pytest.raises(ConfigError) as info:
        resume.prepare_run_dir(changed, loop.run_model_of(changed), [50], True, print)
    message = str(info.value)
    assert "cannot resume from step 50" in message and "RunModel(" not in message
    assert "lora.rank: 16 -> 8 (cannot change" in message
    assert "data.seq_len: 128 -> 64; optimizer.learning_rate: 0.002 -> 0.001 (breaks exact resume; allow with " \
           "resume.allow_changes=[data.seq_len,optimizer.learning_rate])" in message
    assert "save_every" not in message and "eval_rows" not in message  # free to change
    assert not os.path.exists(os.path.join(run_dir, resume.CHANGES_FILE))
    assert runs.read_manifest(run_dir) == loop.run_model_of(first)  # nothing rewritten


def test_allowed_changes_are_recorded_in_changes_jsonl_and_the_config_rewritten(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    first = _config(run_dir)
    resume.prepare_run_dir(first, loop.run_model_of(first), [], True, print)
    changed = _config(run_dir, "data.seq_len=64", "optimizer.learning_rate=0.001", "save_every=7",
                      "resume.allow_changes=[data.seq_len,optimizer.*]")
    messages = []
    resume.prepare_run_dir(changed, loop.run_model_of(changed), [50, 100], True, messages.append)
    with open(os.path.join(run_dir, resume.CHANGES_FILE), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["key"], r["old"], r["new"], r["via_allow_changes"]) for r in rows] == [
        (100, "data.seq_len", 128, 64, True), (100, "optimizer.learning_rate", 0.002, 0.001, True),
        (100, "save_every", 50, 7, False)]
    assert "data.seq_len: 128 -> 64" in messages[0] and resume.CHANGES_FILE in messages[0]
    assert load_config(os.path.join(run_dir, resume.CONFIG_FILE)).data.seq_len == 64


def test_a_changed_base_path_or_quantisation_is_named_from_model_json(tmp_path):
    """Without config.yaml (an older run), model.json's fields are compared, named as config keys."""
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    first = _config(run_dir)
    runs.write_manifest(run_dir, loop.run_model_of(first))
    changed = _config(run_dir, "model.quantize=none", f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match=f"model.path: bundled:tiny -> {tmp_path}; model.quantize: nf4 -> none "
                                          f"\\(breaks exact resume"):
        resume.prepare_run_dir(changed, loop.run_model_of(changed), [10], True, print)


def test_allow_changes_must_name_config_keys(tmp_path):
    config = _config(tmp_path, "resume.allow_changes=[data.seqlen]")
    with pytest.raises(ConfigError, match="'data.seqlen' names no config key"):
        resume.prepare_run_dir(config, loop.run_model_of(config), [], True, print)


# --- before anything is built ---------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expected", [
    (["mesh=data=4,tensor=2", "batch_size=6"],
     "mesh data=4,tensor=2: batch_size 6 is not divisible by data x fsdp x expert = 4"),
    (["mesh=data=2,fsdp=2,tensor=2", "batch_size=8", "micro_batches=4"],
     "batch_size 8 as 4 micro-batches of 2 rows: 2 is not divisible by data x fsdp x expert = 4"),
])
def test_a_batch_the_mesh_does_not_split_is_refused_before_anything_is_built(tmp_path, empty_file, extra, expected):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=expected):  # not the data's error: refused before the data is read
        loop.train(_config(run_dir, f"data.train=[{empty_file}]", *extra), log=lambda _: None)
    assert not run_dir.exists()


@pytest.mark.parametrize("preset, name", [("pretrain_tiny", "empty.txt"), ("sft_tiny", "empty.jsonl")])
def test_an_empty_data_file_is_named(tmp_path, preset, name):
    path = tmp_path / name
    path.write_text("", encoding="utf-8")
    config = _config(tmp_path / "run", f"data.train=[{path}]", "model.path=bundled:tiny", preset=preset)
    tokenizer = load_tokenizer(config.model.tokenizer, model=runs.model_directory(config.model.path))
    with pytest.raises(DataError, match=f"^{path}: 0 examples are fewer than one global batch of 8$"):
        loop.load_data(config, tokenizer, lambda _: None)


def test_a_second_trainer_on_a_held_run_dir_is_refused_naming_host_and_pid(tmp_path, empty_file):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "id": "x",
                                                     "started": "2026-12-01T00:00:00Z", "command": "train"}))
        with pytest.raises(RunDirLocked, match=f"in use by process {sleeper.pid} on host {socket.gethostname()}"):
            loop.train(_config(run_dir, f"data.train=[{empty_file}]"), log=lambda _: None)
        assert not (run_dir / runs.MANIFEST).exists()  # refused before it touched anything
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_dead_trainers_lock_is_taken_over_and_released_when_the_start_fails(tmp_path, empty_file):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "id": "x"}))
    messages = []
    with pytest.raises(DataError):
        loop.train(_config(run_dir, f"data.train=[{empty_file}]"), log=messages.append)
    assert any(f"taking over the lock of process {dead.pid}" in m for m in messages)
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_start_that_failed_before_any_checkpoint_binds_the_run_dir_to_nothing(tmp_path, empty_file):
    """The first start fails on its data after writing model.json; the retry with another lora.rank gets as
    far (the data again), instead of being refused as another model."""
    run_dir = tmp_path / "run"
    with pytest.raises(DataError):
        loop.train(_config(run_dir, f"data.train=[{empty_file}]"), log=lambda _: None)
    assert runs.read_manifest(str(run_dir)).lora["rank"] == 16
    messages = []
    with pytest.raises(DataError):
        loop.train(_config(run_dir, f"data.train=[{empty_file}]", "lora.rank=4"), log=messages.append)
    assert runs.read_manifest(str(run_dir)).lora["rank"] == 4
    assert any("replacing model.json" in m for m in messages)


@pytest.mark.slow
def test_sequences_past_max_position_embeddings_are_warned_about_once(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(loop, "load_data", stop)  # the warning comes before the data is read
    messages = []
    with pytest.raises(Stop):
        loop.train(_config(tmp_path / "run", "data.seq_len=32", "model.implementation.max_position_embeddings=16"),
                   log=messages.append)
    warnings = [m for m in messages if "max_position_embeddings" in m]
    assert len(warnings) == 1 and "data.seq_len 32 is beyond the max_position_embeddings 16" in warnings[0]
    assert "RoPE" in warnings[0]


@pytest.mark.slow
def test_two_trainers_on_one_run_dir_the_second_is_refused_and_sigterm_releases_the_lock(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("\n".join(peoples_daily("train")[:200]) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "mixtral_jax.cli", "train", "pretrain_tiny", f"run_dir={run_dir}", *QUIET,
            f"data.train=[{data}]", "data.seq_len=32", "steps=100000", "save_every=100000", "log_every=1"]
    env = {**os.environ, "PYTHONPATH": REPO}
    first = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / LOCK_FILE).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-2000:]
        second = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2
        assert f"in use by process {first.pid} on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=240)
        assert first.returncode in (0, -signal.SIGTERM)  # saved and ended, or ended by the signal before its loop
        assert not (run_dir / LOCK_FILE).exists()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
