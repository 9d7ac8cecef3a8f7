"""Training rows: SFT examples padded and packed as the trainer did before stores existed (a copy of that code
is the reference), blocks, concatenation and replay."""

from __future__ import annotations

import numpy as np
import pytest

from mixtral_jax.data.corpora import hsk_instructions
from mixtral_jax.data.sequences import (
    BlockRows,
    Blocks,
    Concatenated,
    Examples,
    PackedRows,
    PaddedRows,
    Repeated,
    replay_count,
    stack,
)
from mixtral_jax.data.sft import build_sft
from mixtral_jax.data.texts import DataError


def reference_pack(examples, length, pad_id):
    """train/sft.py's pack_examples before prepared stores (commit cd40cba), kept as the reference."""
    packed, used = [], length
    for example in examples:
        if used + len(example[0]) > length:
            packed.append([])
            used = 0
        packed[-1].append(example)
        used += len(example[0])
    out = {"input_ids": np.full((len(packed), length), pad_id, np.int32),
           "labels": np.full((len(packed), length), -100, np.int32),
           "attention_mask": np.zeros((len(packed), length), np.int32)}
    for row, members in enumerate(packed):
        start = 0
        for segment, (ids, labels) in enumerate(members, 1):
            end = start + len(ids)
            out["input_ids"][row, start:end] = ids
            out["labels"][row, start:end] = labels
            out["attention_mask"][row, start:end] = segment
            start = end
    return out


@pytest.fixture(scope="module")
def examples(sp):
    pairs, _ = build_sft(hsk_instructions("heldout")[:40], sp, max_length=64)
    return pairs


def test_examples_keep_ids_and_where_the_labels_start(examples):
    stored = Examples.from_pairs(examples)
    assert len(stored) == len(examples)
    for index, (ids, labels) in enumerate(examples):
        got, prompt = stored.example(index)
        assert got.tolist() == ids and labels == [-100] * prompt + ids[prompt:]
    np.testing.assert_array_equal(stored.lengths(), [len(ids) for ids, _ in examples])


def test_padded_rows(sp):
    rows = PaddedRows(Examples.from_pairs([([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])]), 4, pad_id=sp.eos_id)
    out = stack(rows)
    np.testing.assert_array_equal(out["input_ids"], [[1, 5, 6, 2], [1, 7, 2, 2]])
    np.testing.assert_array_equal(out["labels"], [[-100, 5, 6, -100], [-100, 7, -100, -100]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert all(v.dtype == np.int32 for v in out.values())
    with pytest.raises(DataError, match="more than the row length 2"):
        PaddedRows(Examples.from_pairs([([1, 5, 6], [-100, 5, 6])]), 2, pad_id=2)


@pytest.mark.parametrize("length", [64, 96, 200])
def test_packed_rows_equal_the_trainers_earlier_packing(examples, sp, length):
    out = stack(PackedRows(Examples.from_pairs(examples), length, pad_id=sp.eos_id))
    reference = reference_pack(examples, length, sp.eos_id)
    assert len(out["input_ids"]) < len(examples) or length == 64
    for key in reference:
        np.testing.assert_array_equal(out[key], reference[key])


def test_packed_rows_keep_every_example_whole(examples, sp):
    out = stack(PackedRows(Examples.from_pairs(examples), 96, pad_id=sp.eos_id))
    rebuilt = []
    for ids, labels, segments in zip(out["input_ids"], out["labels"], out["attention_mask"]):
        used = int(np.count_nonzero(segments))
        assert np.all(segments[used:] == 0) and np.all(ids[used:] == sp.eos_id) and np.all(labels[used:] == -100)
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            assert labels[where][0] == -100  # no prediction across a segment boundary
            rebuilt.append((ids[where].tolist(), labels[where].tolist()))
    assert rebuilt == examples


def test_sharded_blocks_and_examples_read_across_shards(examples):
    blocks = np.arange(7 * 3, dtype=np.int32).reshape(7, 3)
    sharded = Blocks([blocks[:3], blocks[3:6], blocks[6:]], seq_len=3, shard_rows=3)
    np.testing.assert_array_equal(stack(BlockRows(sharded))["input_ids"], blocks)
    with pytest.raises(IndexError):
        sharded.block(7)
    halves = [Examples.from_pairs(examples[:20]).shards[0], Examples.from_pairs(examples[20:]).shards[0]]
    joined = Examples(halves, shard_rows=20)
    assert [joined.example(i)[0].tolist() for i in range(len(examples))] == [ids for ids, _ in examples]


def test_block_rows_are_their_own_labels():
    row = BlockRows(Blocks([np.arange(8, dtype=np.int32).reshape(2, 4)], 4))[1]
    np.testing.assert_array_equal(row["labels"], row["input_ids"])
    assert row["attention_mask"].tolist() == [1, 1, 1, 1]


def test_replay_rows_make_up_their_share_repeated_in_order():
    main = BlockRows(Blocks([np.arange(80, dtype=np.int32).reshape(20, 4)], 4))
    replay = BlockRows(Blocks([1000 + np.arange(12, dtype=np.int32).reshape(3, 4)], 4))
    count = replay_count(len(main), 0.2)  # 20 blocks are 80%: 5 replay blocks, the 3 repeated in order
    mixed = stack(Concatenated([main, Repeated(replay, count)]))["input_ids"]
    assert count == 5 and mixed.shape == (25, 4)
    np.testing.assert_array_equal(mixed[:20], np.arange(80).reshape(20, 4))
    np.testing.assert_array_equal(mixed[20:], 1000 + np.arange(12).reshape(3, 4)[[0, 1, 2, 0, 1]])
    assert replay_count(20, 0.0) == 0
    with pytest.raises(DataError, match="must be in"):
        replay_count(20, 1.0)
    with pytest.raises(DataError, match="no block"):
        Repeated(BlockRows(Blocks([np.zeros((0, 4), np.int32)], 4)), 2)
