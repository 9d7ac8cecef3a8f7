"""A run's data: the batch iterator's host split, shuffling and exact resumption; prepared stores read by the
trainer exactly as the raw sources they were made from, and refused when they do not fit the run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mixtral_jax.data.corpora import hsk_english
from mixtral_jax.data.prepare import prepare
from mixtral_jax.data.sequences import BlockRows, Blocks, stack
from mixtral_jax.data.texts import DataError
from mixtral_jax.errors import ConfigError
from train.config import load_config
from train.data import BatchIterator, batch_split, load_rows

# --- the batch iterator -------------------------------------------------------------------------------------


def _rows(rows=50, length=3):
    """Block i holds 3i, 3i + 1, 3i + 2: a row's first token names it."""
    return BlockRows(Blocks([np.arange(rows * length, dtype=np.int32).reshape(rows, length)], length))


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def test_hosts_split_each_global_batch():
    rows = _rows()
    whole = BatchIterator(rows, 8, seed=3, process_index=0, process_count=1)
    hosts = [BatchIterator(rows, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    assert whole.steps_per_epoch == 6
    seen = []
    for batch in _take(whole, 12):
        shares = [next(h) for h in hosts]
        assert all(share["input_ids"].shape == (4, 3) for share in shares)
        assert not set(shares[0]["input_ids"][:, 0]) & set(shares[1]["input_ids"][:, 0])
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), batch[key])
        np.testing.assert_array_equal(batch["labels"], batch["input_ids"])  # rows stay whole
        seen.append(batch["input_ids"][:, 0] // 3)
    for epoch in (seen[:6], seen[6:]):  # no row twice in an epoch; 50 - 48 rows left out each epoch
        assert len(set(np.concatenate(epoch))) == 48


def test_shuffling_per_epoch_and_seed():
    def order(seed, steps=10):
        return np.concatenate([b["input_ids"][:, 0] for b in _take(BatchIterator(_rows(), 10, seed=seed,
                                                                                 process_index=0,
                                                                                 process_count=1), steps)])
    first = order(0)
    assert not np.array_equal(first[:50], first[50:])  # epoch 1 differs from epoch 0
    assert not np.array_equal(first, order(1))  # another seed differs
    np.testing.assert_array_equal(order(0), first)
    assert sorted(first[:50] // 3) == list(range(50))  # an epoch is a permutation


@pytest.mark.parametrize("taken", [0, 4, 6, 7])  # 6 is exactly the end of epoch 0
def test_state_restore_continues_identically(taken):
    rows = _rows()
    original = BatchIterator(rows, 8, seed=5, process_index=1, process_count=2)
    _take(original, taken)
    state = json.loads(json.dumps(original.state()))  # plain ints, fit for a checkpoint's metadata
    resumed = BatchIterator(rows, 8, seed=0, process_index=1, process_count=2)
    resumed.restore(state)
    for expected, got in zip(_take(original, 9), _take(resumed, 9)):  # crosses into the next epoch
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert resumed.state() == original.state()


def test_iterator_errors():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchIterator(_rows(rows=3), 4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not divisible"):
        BatchIterator(_rows(), 6, process_index=0, process_count=4)
    with pytest.raises(DataError, match="does not fit"):
        BatchIterator(_rows(), 8, process_index=0, process_count=1).restore({"epoch": 0, "position": 7, "seed": 0})


def test_too_few_examples_name_the_sources():
    with pytest.raises(DataError, match=r"^/data/a\.txt, b\.jsonl: 0 examples are fewer than one global batch of 8$"):
        BatchIterator(_rows(rows=0), 8, process_index=0, process_count=1, sources=["/data/a.txt", "b.jsonl"])


def test_batch_split_follows_the_sharding_rules_batch_axes():
    assert batch_split({"data": 2, "fsdp": 2, "expert": 2, "tensor": 2}, 16) == 8  # tensor does not split it
    assert batch_split({"tensor": 4}, 6) == 1
    with pytest.raises(ConfigError, match="^batch_size 6 is not divisible by data x fsdp x expert = 4, the axes "):
        batch_split({"data": 4}, 6)
    with pytest.raises(ConfigError, match="batch_size 8 as 4 micro-batches of 2 rows: 2 is not divisible by data x "
                                          "fsdp x expert = 4"):
        batch_split({"fsdp": 2, "expert": 2}, 8, micro_batches=4)
    with pytest.raises(ValueError, match="^--batch 6 is not"):
        batch_split({"data": 4}, 6, what="--batch", error=ValueError)


# --- sources: raw and prepared ----------------------------------------------------------------------------------

def _config(tmp_path, preset="pretrain_tiny", *overrides):
    return load_config(preset, [f"run_dir={tmp_path / 'run'}", "data.seq_len=32", *overrides])


def test_replay_sources_enter_training_sequences_only(tmp_path, sp):
    config = _config(tmp_path, "pretrain_tiny", "data.train=[bundled:peoples-daily-heldout]",
                     "data.replay=[bundled:hsk-english-heldout]", "data.replay_share=0.25")
    plain, _ = load_rows(config, config.data.train, sp)
    mixed, _ = load_rows(config, config.data.train, sp, replay=True)
    added = len(mixed) - len(plain)
    assert added == round(len(plain) / 3)  # a quarter of the whole
    english = {i for line in hsk_english("heldout") for i in sp.encode(line, add_bos=False)}
    tail = stack(mixed, range(len(plain), len(mixed)))["input_ids"]
    assert set(tail.ravel().tolist()) <= english | {sp.bos_id, sp.eos_id}


@pytest.mark.parametrize("kind, sources, overrides", [
    ("pretrain", ["bundled:peoples-daily-heldout", "bundled:hsk-english-heldout"], ["data.group_lines=50"]),
    ("sft", ["bundled:hsk-instructions-heldout"], []),
    ("sft", ["bundled:hsk-instructions-heldout"], ["data.packing=true"]),
])
def test_a_store_gives_the_rows_of_its_raw_sources(tmp_path, sp, kind, sources, overrides):
    """Prepared in 2 worker processes, in shards of 50 rows: the same rows in the same order as the trainer
    builds from the raw sources (blocks, padded and packed SFT examples, dropped samples)."""
    config = _config(tmp_path, f"{kind}_tiny", f"data.train={json.dumps(sources)}", *overrides)
    manifest = prepare(sources, str(tmp_path / "store"), kind, 32, group_lines=config.data.group_lines, workers=2,
                       shard_rows=50, progress=False)
    raw, raw_dropped = load_rows(config, sources, sp)
    stored, stored_dropped = load_rows(config, [str(tmp_path / "store")], sp)
    assert len(manifest["shards"]) > 1 and manifest["counts"]["sequences"] >= len(raw)
    assert len(stored) == len(raw) > 50 and stored_dropped == raw_dropped
    for key, value in stack(raw).items():
        np.testing.assert_array_equal(stack(stored)[key], value)
    assert [s["source"] for s in manifest["sources"]] == sources and all(s["bytes"] > 0 for s in manifest["sources"])
    assert sum(s["bytes"] for s in manifest["sources"]) == manifest["counts"]["text_bytes"]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stores") / "pd")
    prepare(["bundled:peoples-daily-heldout"], out, "pretrain", 32, workers=1, shard_rows=100, progress=False)
    return out


def _copy(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    return copy


@pytest.mark.parametrize("change, message", [
    (["data.seq_len=64"], r"manifest\.json: field 'seq_len' is 32, but the run's data\.seq_len is 64"),
    (["data.kind=sft"], r"manifest\.json: field 'kind' is 'pretrain', but the run's data\.kind is 'sft'"),
])
def test_a_store_made_for_another_run_is_refused(tmp_path, sp, small_store, change, message):
    config = load_config("pretrain_tiny", [f"run_dir={tmp_path}", "data.seq_len=32", *change])
    with pytest.raises(DataError, match=message):
        load_rows(config, [small_store], sp)


def test_a_store_of_another_tokenizer_a_damaged_shard_or_a_newer_format_is_refused(tmp_path, sp, small_store):
    config = _config(tmp_path)
    copy = _copy(small_store, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": {**manifest["tokenizer"],
                                                                               "vocab_size": 32064}}))
    with pytest.raises(DataError, match=r"field 'tokenizer\.vocab_size' is 32064, but the run's tokenizer has 32000"):
        load_rows(config, [str(copy)], sp)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="field 'version' is 99, made by a newer mixtral-jax"):
        load_rows(config, [str(copy)], sp)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shard = copy / "shard-00001.blocks.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"shard-00001\.blocks\.bin: .* bytes, but .*field 'shards\[1\]\.files\.blocks'"):
        load_rows(config, [str(copy)], sp)
    os.unlink(shard)
    with pytest.raises(DataError, match=r"shard-00001\.blocks\.bin: missing"):
        load_rows(config, [str(copy)], sp)
    os.unlink(copy / "manifest.json")  # what an interrupted prepare would leave: no store at all
    with pytest.raises(DataError, match="prepared stores and raw sources mixed"):
        load_rows(config, [str(copy), small_store], sp)
