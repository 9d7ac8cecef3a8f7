"""`mixtral-jax data prepare`: the command's contract, parallel workers giving the serial result, an
interrupted prepare leaving nothing that looks complete, a gs:// output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mixtral_jax.cli.main import main
from mixtral_jax.data import prepare as prepare_module
from mixtral_jax.data import store
from mixtral_jax.data.corpora import peoples_daily
from mixtral_jax.data.pretrain import pretrain_blocks
from mixtral_jax.data.sequences import stack
from tests.helpers.gcs_emulator import fake_gcs
from tests.helpers.tokenizers import hf_tokenizer_dir

TEXTS = peoples_daily("heldout")[:300]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "zh.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return str(path)


def _blocks(path):
    _, blocks = store.open_store(path)
    return np.stack([blocks.block(i) for i in range(len(blocks))])


@pytest.mark.slow  # two worker processes start (spawn)
def test_the_command_prepares_the_trainers_blocks_with_parallel_workers(tmp_path, corpus, sp, capsys):
    out = tmp_path / "store"
    assert main(["data", "prepare", corpus, "--out", str(out), "--seq-len", "64", "--group-lines", "40",
                 "--workers", "2", "--shard-rows", "30"]) == 0
    assert "pretrain sequences" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    reference = pretrain_blocks(TEXTS, sp, block_size=64, group_lines=40)
    assert manifest["counts"]["sequences"] == len(reference) and manifest["counts"]["tokens"] == reference.size
    assert manifest["rules"]["group_lines"] == 40 and manifest["sources"] == [
        {"source": corpus, "bytes": os.path.getsize(corpus) - len(TEXTS)}]  # the newlines are not text
    assert len(manifest["shards"]) == -(-len(reference) // 30)
    np.testing.assert_array_equal(_blocks(str(out)), reference)


def test_sft_store_and_the_model_option(tmp_path, sp):
    out, model = tmp_path / "sft", hf_tokenizer_dir(tmp_path)
    with pytest.raises(SystemExit):  # --out is required
        main(["data", "prepare", "bundled:hsk-instructions-heldout"])
    assert main(["data", "prepare", "bundled:hsk-instructions-heldout", "--kind", "sft", "--seq-len", "48",
                 "--workers", "1", "--out", str(out), "--model", model]) == 0
    manifest, examples = store.open_store(str(out))
    assert manifest["kind"] == "sft" and len(examples) == manifest["counts"]["sequences"] > 0
    assert manifest["tokenizer"]["path"] == os.path.join(model, "tokenizer.model")
    assert manifest["counts"]["tokens"] == int(examples.lengths().sum())


def test_an_interrupted_prepare_leaves_nothing_and_keeps_an_older_store(tmp_path, corpus, monkeypatch):
    out = tmp_path / "store"
    prepare_module.prepare([corpus], str(out), seq_len=64, workers=1, progress=False)
    before = _blocks(str(out))
    calls = []

    def interrupted(*args):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(args)
        return real(*args)

    real = prepare_module._blocks_task
    monkeypatch.setattr(prepare_module, "_blocks_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_module.prepare([corpus], str(out), seq_len=32, workers=1, group_lines=10, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["store"]  # no half-written sibling
    np.testing.assert_array_equal(_blocks(str(out)), before)


def test_bad_input_is_one_error_naming_it(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt" in capsys.readouterr().err and not os.path.exists(tmp_path / "o")
    with pytest.raises(Exception, match="not a prepared data store"):
        store.read_manifest(str(tmp_path))


@pytest.mark.slow  # a GCS emulator process
def test_a_gs_store_is_uploaded_manifest_last_and_read_through_a_local_copy(tmp_path, corpus, sp, monkeypatch):
    from train.config import load_config
    from train.data import load_rows

    monkeypatch.setenv("MIXTRAL_JAX_DATA_CACHE", str(tmp_path / "cache"))
    with fake_gcs() as bucket:
        remote = f"{bucket}/stores/zh"
        prepare_module.prepare([corpus], remote, seq_len=64, workers=1, shard_rows=20, progress=False)
        assert store.is_store(remote)
        config = load_config("pretrain_tiny", [f"run_dir={tmp_path / 'run'}", "data.seq_len=64"])
        rows, _ = load_rows(config, [remote], sp)
        np.testing.assert_array_equal(stack(rows)["input_ids"], pretrain_blocks(TEXTS, sp, 64, 1000))
        assert len(os.listdir(tmp_path / "cache")) == 1  # read again: the copy is reused
        load_rows(config, [remote], sp)
        assert len(os.listdir(tmp_path / "cache")) == 1
