"""Training runs end to end on the bundled tiny model: exact resume (after a planned stop and after SIGTERM),
a NaN stopping the run with its last checkpoint intact, metrics, the tiny presets, and from_pretrained(run_dir)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.checkpoints import pretrained
from mixtral_jax.checkpoints import run_manifest as runs
from mixtral_jax.checkpoints import run_state as checkpoint
from mixtral_jax.data.corpora import peoples_daily
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model.lora import LoraConfig, LoRAParam
from tests.helpers.gcs_emulator import fake_gcs
from train import loop
from train.config import ConfigError, load_config
from train.metrics import read_metrics

STEPS = 12
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "zh.txt"
    path.write_text("\n".join(peoples_daily("train")[:400]) + "\n", encoding="utf-8")
    heldout = path.with_name("heldout.txt")
    heldout.write_text("\n".join(peoples_daily("heldout")[:60]) + "\n", encoding="utf-8")
    return str(path), str(heldout)


def _overrides(run_dir, corpus, *extra):
    train_file, heldout = corpus
    return [f"run_dir={run_dir}", f"steps={STEPS}", "batch_size=8", "log_every=1", "save_every=4", "eval_every=0",
            "progress=false", "data.seq_len=32", f"data.train=[{train_file}]", f"data.eval=[{heldout}]",
            "data.eval_rows=8", "peak_tflops=0.1", *extra]


def _run(run_dir, corpus, *extra):
    return loop.train(load_config("pretrain_tiny", _overrides(run_dir, corpus, *extra)), log=lambda _: None)


def _losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    summary = _run(run_dir, corpus)
    return run_dir, summary


@pytest.mark.slow
def test_metrics_hold_every_field_and_the_loss_falls(straight):
    run_dir, summary = straight
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_share"):
            assert key in row, key
        shares = np.asarray(row["expert_share"])
        assert shares.shape == (2, 8) and np.allclose(shares.sum(-1), 1, atol=1e-4)
    assert rows[1]["tokens_per_s"] > 0 and 0 < rows[1]["mfu"] < 1
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["eval_after"]["eval_ppl"] < summary["eval_before"]["eval_ppl"]
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["12", "4", "8"]


@pytest.mark.slow
def test_resume_after_a_stop_equals_the_uninterrupted_run_bit_for_bit(straight, corpus, tmp_path):
    first = _run(str(tmp_path), corpus, "stop_at_step=6")
    assert first["stopped"] == "stop_at_step after step 6" and first["end_step"] == 6
    second = _run(str(tmp_path), corpus)
    assert second["start_step"] == 6 and second["end_step"] == STEPS
    expected, resumed = _losses(straight[0]), _losses(str(tmp_path))
    assert resumed == expected  # exact floats, steps 1-12 (7-12 after the resume)


@pytest.mark.slow
def test_a_run_from_a_prepared_store_equals_the_run_from_its_raw_sources(straight, corpus, tmp_path):
    """The same losses bit for bit, and the same held-out scores, when train and eval data are prepared stores
    (2 worker processes), resumed half-way as well."""
    from mixtral_jax.data.prepare import prepare

    stores = [str(tmp_path / name) for name in ("train", "eval")]
    for source, store in zip(corpus, stores):
        prepare([source], store, "pretrain", 32, workers=2, shard_rows=64, progress=False)
    prepared = (f"data.train=[{stores[0]}]", f"data.eval=[{stores[1]}]")
    first = _run(str(tmp_path / "run"), corpus, "stop_at_step=6", *prepared)
    summary = _run(str(tmp_path / "run"), corpus, *prepared)
    assert first["train_sequences"] == straight[1]["train_sequences"] and summary["end_step"] == STEPS
    assert _losses(str(tmp_path / "run")) == _losses(straight[0])
    assert summary["eval_after"] == straight[1]["eval_after"]


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resume_equals_the_uninterrupted_run(straight, corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    argv = [sys.executable, "-m", "mixtral_jax.cli", "train", "pretrain_tiny", *_overrides(tmp_path, corpus)]
    process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:  # eval row + 3 steps
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"].startswith("SIGTERM") and summary["end_step"] < STEPS
    assert checkpoint.open_manager(str(tmp_path)).latest_step() == summary["end_step"]
    _run(str(tmp_path), corpus)
    assert _losses(str(tmp_path)) == _losses(straight[0])


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    make_step = loop.make_train_step

    def with_nan_at_step_6(*args, **kwargs):
        step_fn = make_step(*args, **kwargs)

        def step(params, opt_state, batch, frozen, key):
            params, opt_state, metrics = step_fn.step(params, opt_state, batch, frozen, key)
            step.calls += 1
            if step.calls == 6:
                metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
            return params, opt_state, metrics

        step.calls = 0
        return step_fn._replace(step=step)

    monkeypatch.setattr(loop, "make_train_step", with_nan_at_step_6)
    with pytest.raises(loop.TrainingDiverged, match="step 6: the loss is nan.*last checkpoint: step 4"):
        _run(str(tmp_path), corpus)
    assert checkpoint.open_manager(str(tmp_path)).all_steps() == [4]
    model = mj.from_pretrained(str(tmp_path))  # restorable
    assert np.isfinite(np.asarray(model(jnp.ones((1, 8), jnp.int32)).logits)).all()


@pytest.mark.slow
def test_the_run_builds_its_optimizer_from_the_optimizer_section(corpus, tmp_path, monkeypatch):
    """train.optim.make_optimizer (the factory `mixtral-jax plan` counts) gets the config's own optimizer section
    and the steps the run computed."""
    make_optimizer, calls = loop.make_optimizer, []

    def recording(config, total_steps):
        calls.append((config, total_steps))
        return make_optimizer(config, total_steps)

    monkeypatch.setattr(loop, "make_optimizer", recording)
    config = load_config("pretrain_tiny", _overrides(tmp_path, corpus, "steps=1", "data.eval=[]"))
    assert loop.train(config, log=lambda _: None)["end_step"] == 1
    assert calls == [(config.optimizer, 1)]


@pytest.mark.slow
def test_from_pretrained_run_dir_gives_the_trained_model_and_merging_keeps_its_logits(corpus, tmp_path):
    _run(str(tmp_path), corpus, "model.quantize=none", "steps=4", "lora.dropout=0.0")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (2, 16)))
    trained = mj.from_pretrained(str(tmp_path))
    base = mj.from_pretrained(runs.base_path("bundled:tiny"), "float32")
    merged = pretrained.load_run(str(tmp_path), merge=True)
    assert trained.lora is not None and merged.lora is None
    trained_logits = np.asarray(trained(ids).logits)
    assert np.abs(trained_logits - np.asarray(base(ids).logits)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(merged(ids).logits), trained_logits, atol=1e-4, rtol=0)
    halved = mj.from_pretrained(str(tmp_path), "bf16")  # the dtype asked for, not the run's float32
    base_dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(halved, nnx.All(nnx.Param, nnx.Not(LoRAParam))))}
    assert base_dtypes == {jnp.dtype("bfloat16")} and halved.config.dtype == "bfloat16"  # adapters stay fp32
    halved_logits = np.asarray(halved(ids).logits.astype(jnp.float32))
    assert 0 < np.abs(halved_logits - trained_logits).max() < 0.1 * np.abs(trained_logits).max()
    with pytest.raises(ValueError, match="is a training run, which brings its own adapters"):
        mj.from_pretrained(str(tmp_path), lora=LoraConfig(rank=2))


@pytest.mark.slow
def test_a_run_dir_of_another_model_is_refused_naming_the_fields(straight, corpus):
    with pytest.raises(ConfigError, match="cannot resume from step 12 with this config: lora.rank: 16 -> 4 "
                                          "\\(cannot change: the checkpoints hold the old shapes"):
        _run(straight[0], corpus, "lora.rank=4")


@pytest.mark.slow
def test_a_resume_refuses_changes_that_break_it_unless_allowed_and_records_them(straight, corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(straight[0], run_dir)
    with pytest.raises(ConfigError, match="data.seq_len: 32 -> 16; steps: 12 -> 14 \\(breaks exact resume; allow "
                                          "with resume.allow_changes=\\[data.seq_len,steps\\]\\)"):
        _run(run_dir, corpus, "steps=14", "data.seq_len=16")
    summary = _run(run_dir, corpus, "steps=14", "resume.allow_changes=[steps]")
    assert summary["start_step"] == 12 and summary["end_step"] == 14
    with open(os.path.join(run_dir, "changes.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["key"], r["old"], r["new"], r["via_allow_changes"]) for r in rows] == [
        (12, "steps", 12, 14, True)]
    assert load_config(os.path.join(run_dir, "config.yaml")).steps == 14


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_named_and_resume_falls_back_keeping_it_aside(straight, corpus, tmp_path,
                                                                                    capsys):
    """checkpoints/12 truncated: from_pretrained and export-peft name it in one line; the trainer resumes from
    step 8, moves 12 aside (renamed, not deleted, no longer listed) and ends as the uninterrupted run did."""
    from mixtral_jax.cli.main import main

    run_dir = str(tmp_path / "run")
    shutil.copytree(straight[0], run_dir)
    checkpoints = os.path.join(run_dir, "checkpoints")
    for root, _, files in os.walk(os.path.join(checkpoints, "12", "params")):
        for name in files:
            os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)
    damaged = "checkpoints/12: the checkpoint of step 12 cannot be restored"
    with pytest.raises(CheckpointError, match=damaged + ".*other checkpoints: \\[4, 8\\]"):
        mj.from_pretrained(run_dir)
    capsys.readouterr()
    assert main(["convert", "export-peft", run_dir, str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert damaged in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

    messages = []
    summary = loop.train(load_config("pretrain_tiny", _overrides(run_dir, corpus)), log=messages.append)
    assert summary["start_step"] == 8 and summary["end_step"] == STEPS
    assert any(damaged in m and "resuming from step 8" in m for m in messages), messages
    assert any("moved aside to" in m and "12.damaged-" in m for m in messages), messages
    aside = [name for name in os.listdir(checkpoints) if name.startswith("12.damaged-")]
    assert len(aside) == 1 and os.listdir(os.path.join(checkpoints, aside[0]))  # kept, files and all
    assert sorted(checkpoint.open_manager(run_dir).all_steps()) == [4, 8, 12]
    assert _losses(run_dir) == _losses(straight[0])  # bit for bit, steps 9-12 after the fall-back


@pytest.mark.slow
def test_tiny_presets_pretrain_then_sft_lower_heldout_perplexity(tmp_path):
    """pretrain_tiny.yaml then sft_tiny.yaml (whose base is the pre-training run), with fewer steps."""
    pretrain_dir, sft_dir = str(tmp_path / "pretrain"), str(tmp_path / "sft")
    quiet = ["progress=false", "log_every=5", "save_every=100"]
    pretrain = loop.train(load_config("pretrain_tiny", [f"run_dir={pretrain_dir}", "steps=30", *quiet]),
                          log=lambda _: None)
    sft = loop.train(load_config("sft_tiny", [f"run_dir={sft_dir}", f"model.path={pretrain_dir}", "steps=20",
                                              *quiet]), log=lambda _: None)
    for summary in (pretrain, sft):
        assert summary["eval_after"]["eval_ppl"] < 0.5 * summary["eval_before"]["eval_ppl"], summary
    # SFT starts where pre-training ended: its base is the merged pre-trained model, not the random tiny one.
    assert sft["eval_before"]["eval_ppl"] < 0.5 * loop.train(
        load_config("sft_tiny", [f"run_dir={tmp_path / 'from_base'}", "model.path=bundled:tiny", "steps=1",
                                 *quiet]), log=lambda _: None)["eval_before"]["eval_ppl"]


@pytest.mark.slow
def test_a_checkpoint_resumes_onto_another_mesh(straight, corpus, tmp_path):
    _run(str(tmp_path), corpus, "stop_at_step=6")
    _run(str(tmp_path), corpus, "mesh=fsdp=2,expert=4")
    expected, resumed = _losses(straight[0]), _losses(str(tmp_path))
    assert list(resumed) == list(expected)
    np.testing.assert_allclose([resumed[s] for s in range(7, STEPS + 1)], [expected[s] for s in range(7, STEPS + 1)],
                               rtol=1e-4)  # fp32 sums in another order


@pytest.mark.slow
def test_the_trainer_starts_from_an_orbax_nf4_checkpoint(straight, corpus, tmp_path):
    """hf-to-orbax --quantize nf4 gives the QLoRA base the trainer would have built from the HF directory."""
    from mixtral_jax.cli.main import main

    orbax_dir = tmp_path / "orbax"
    assert main(["convert", "hf-to-orbax", runs.base_path("bundled:tiny"), str(orbax_dir), "--quantize",
                 "nf4", "--dtype", "float32", "--quiet"]) == 0
    _run(str(tmp_path / "run"), corpus, f"model.path={orbax_dir}", "steps=2")
    assert _losses(str(tmp_path / "run"))[1] == _losses(straight[0])[1]  # step 1: same base, batch, dropout


@pytest.mark.slow
def test_a_run_on_gs_writes_there_resumes_from_there_and_loads(straight, corpus):
    """run_dir and data on gs:// (a local GCS emulator): stopped after step 2, resumed to step 4, keeping one
    checkpoint; its losses and trained weights equal the local uninterrupted run's."""
    import fsspec

    with fake_gcs() as bucket:
        fs = fsspec.filesystem("gcs")
        remote_corpus = tuple(f"{bucket}/data/{os.path.basename(path)}" for path in corpus)
        for path, url in zip(corpus, remote_corpus):
            fs.put_file(path, url)
        run_dir = f"{bucket}/run"
        _run(run_dir, remote_corpus, "stop_at_step=2", "save_every=1", "keep_checkpoints=1")
        assert checkpoint.open_manager(run_dir).all_steps() == [2]
        summary = _run(run_dir, remote_corpus, "stop_at_step=4", "save_every=1", "keep_checkpoints=1")
        assert summary["start_step"] == 2 and summary["end_step"] == 4
        assert checkpoint.open_manager(run_dir).all_steps() == [4]  # Orbax deleted step 2 on gs://
        names = {name.removeprefix(run_dir.removeprefix("gs://") + "/") for name in fs.find(run_dir)}
        assert {"model.json", "config.yaml", "metrics.jsonl"} <= names
        assert any(name.startswith("checkpoints/4/params/") for name in names)
        events = [name for name in names if name.startswith("tensorboard/events.out.tfevents")]
        assert len(events) == 2 and all(b"lm_loss" in fs.cat(f"{run_dir}/{name}") for name in events)  # a file a run
        assert fs.cat(f"{run_dir}/model.json").decode() == open(os.path.join(straight[0], "model.json")).read()
        expected = _losses(straight[0])
        assert _losses(run_dir) == {step: expected[step] for step in range(1, 5)}  # bit for bit
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 32000, (2, 16)))
        np.testing.assert_array_equal(np.asarray(mj.from_pretrained(run_dir)(ids).logits),
                                      np.asarray(pretrained.load_run(straight[0], step=4)(ids).logits))
