"""Pre-training blocks against the reference recipe run through transformers and datasets."""

from __future__ import annotations

from itertools import chain

import numpy as np

from mixtral_jax.data.corpora import peoples_daily
from mixtral_jax.data.pretrain import chunk_blocks, chunked, pretrain_blocks


def reference_blocks(texts, tokenizer, block_size, group_lines):
    """run_clm_pt_with_peft.py: `tokenizer.add_eos_token = True`, tokenize, then group_texts under
    datasets.map(batched=True) with `group_lines` rows a batch."""
    import datasets

    tokenizer.add_eos_token = True
    try:
        tokenized = tokenizer(list(texts))
    finally:
        tokenizer.add_eos_token = False

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        if total_length >= block_size:
            total_length = (total_length // block_size) * block_size
        result = {k: [t[i:i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    dataset = datasets.Dataset.from_dict({"input_ids": tokenized["input_ids"],
                                          "attention_mask": tokenized["attention_mask"]})
    return dataset.map(group_texts, batched=True, batch_size=group_lines, keep_in_memory=True)["input_ids"]


def test_pretrain_blocks_equal_run_clm_grouping(sp, hf):
    english = ["The quick brown fox jumps over the lazy dog.", "Hello world", "  leading spaces", "a"]
    texts = peoples_daily("heldout")[:40] + english * 3 + ["短"]  # 53 lines: the last chunk is one short line
    ours = pretrain_blocks(texts, sp, block_size=32, group_lines=7)
    reference = reference_blocks(texts, hf, block_size=32, group_lines=7)
    assert [len(b) for b in reference[:-1]] == [32] * (len(reference) - 1) and len(reference[-1]) < 32
    assert ours.dtype == np.int32 and ours.shape == (len(reference) - 1, 32)
    np.testing.assert_array_equal(ours, np.array(reference[:-1]))
    # Several chunks each dropped a remainder: fewer blocks than cutting the whole stream at once.
    total = sum(len(sp.encode(t)) + 1 for t in texts)
    assert len(ours) < total // 32
    assert np.count_nonzero(ours == sp.bos_id) > 7 and np.count_nonzero(ours == sp.eos_id) > 7


def test_pretrain_blocks_without_eos_and_empty(sp):
    blocks = pretrain_blocks(["你好", "世界"], sp, block_size=3, group_lines=10, add_eos=False)
    np.testing.assert_array_equal(blocks.ravel(), (sp.encode("你好") + sp.encode("世界"))[:6])
    assert pretrain_blocks([], sp, block_size=8).shape == (0, 8)


def test_chunks_are_independent(sp):
    """What lets data prepare tokenise chunks in parallel: the blocks are the chunks' blocks end to end."""
    texts = peoples_daily("heldout")[:25]
    chunks = list(chunked(texts, 7))
    assert [len(c) for c in chunks] == [7, 7, 7, 4]
    np.testing.assert_array_equal(np.concatenate([chunk_blocks(c, sp, 16) for c in chunks]),
                                  pretrain_blocks(texts, sp, block_size=16, group_lines=7))


