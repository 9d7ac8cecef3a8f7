"""Training data: pre-training blocks and SFT examples against the reference recipe run through transformers
and datasets, the batch iterator's host split and resumption, and the bundled corpora (sources: test_texts)."""

from __future__ import annotations

import json
import re
import shutil
from itertools import chain

import numpy as np
import pytest

from mixtral_jax.data.corpora import (
    HELDOUT_EVERY,
    CorpusError,
    hsk_english,
    hsk_instructions,
    peoples_daily,
)
from mixtral_jax.data.texts import DataError, read_texts
from mixtral_jax.data.tokenizer import default_tokenizer_path, load_tokenizer
from mixtral_jax.errors import ConfigError
from train.data import BatchIterator, batch_split, pretrain_blocks, pretrain_dataset
from train.sft import build_sft, pack_examples, pad_examples, read_alpaca, sft_example

# The settings of Mixtral-8x7B's tokenizer_config.json that matter here (transformers 5 adds no BOS for a bare
# tokenizer.model). Without a tokenizer_class, transformers converts the SentencePiece model itself, which
# keeps SentencePiece's dummy prefix as transformers 4.37's LlamaTokenizer (legacy), used by Chinese-Mixtral, did.
MIXTRAL_TOKENIZER_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                            "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(None)


def _hf_dir(path, **config):
    shutil.copy(default_tokenizer_path(), path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({**MIXTRAL_TOKENIZER_CONFIG, **config}))
    return str(path)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_hf_dir(tmp_path_factory.mktemp("hf_tok")))
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    return tok


# --- pre-training ---------------------------------------------------------------------------------------

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
    data = pretrain_dataset(blocks)
    np.testing.assert_array_equal(data["labels"], data["input_ids"])
    assert set(data) == {"input_ids", "labels", "attention_mask"} and data["attention_mask"].min() == 1


# --- the batch iterator -------------------------------------------------------------------------------------

def _arrays(rows=50, length=3):
    ids = np.arange(rows * length, dtype=np.int32).reshape(rows, length)
    return {"input_ids": ids, "labels": ids + 1000, "attention_mask": np.ones_like(ids)}


def _take(iterator, steps):
    return [next(iterator) for _ in range(steps)]


def test_hosts_split_each_global_batch():
    arrays = _arrays()
    whole = BatchIterator(arrays, 8, seed=3, process_index=0, process_count=1)
    hosts = [BatchIterator(arrays, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    assert whole.steps_per_epoch == 6
    seen = []
    for batch in _take(whole, 12):
        shares = [next(h) for h in hosts]
        assert all(share["input_ids"].shape == (4, 3) for share in shares)
        assert not set(shares[0]["input_ids"][:, 0]) & set(shares[1]["input_ids"][:, 0])
        for key in arrays:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), batch[key])
        np.testing.assert_array_equal(batch["labels"], batch["input_ids"] + 1000)  # rows stay whole
        seen.append(batch["input_ids"][:, 0] // 3)
    for epoch in (seen[:6], seen[6:]):  # no row twice in an epoch; 50 - 48 rows left out each epoch
        assert len(set(np.concatenate(epoch))) == 48


def test_shuffling_per_epoch_and_seed():
    orders = {seed: [b["input_ids"][:, 0] for b in _take(BatchIterator(_arrays(), 10, seed=seed,
                                                                       process_index=0, process_count=1), 10)]
              for seed in (0, 0, 1)}
    first = np.concatenate(orders[0][:5])
    assert not np.array_equal(first, np.concatenate(orders[0][5:]))  # epoch 1 differs from epoch 0
    assert not np.array_equal(first, np.concatenate(orders[1][:5]))  # another seed differs
    again = [b["input_ids"][:, 0] for b in _take(BatchIterator(_arrays(), 10, seed=0, process_index=0,
                                                              process_count=1), 10)]
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(orders[0]))


@pytest.mark.parametrize("taken", [0, 4, 6, 7])  # 6 is exactly the end of epoch 0
def test_state_restore_continues_identically(taken):
    arrays = _arrays()
    original = BatchIterator(arrays, 8, seed=5, process_index=1, process_count=2)
    _take(original, taken)
    state = json.loads(json.dumps(original.state()))  # plain ints, fit for a checkpoint's metadata
    resumed = BatchIterator(arrays, 8, seed=0, process_index=1, process_count=2)
    resumed.restore(state)
    for expected, got in zip(_take(original, 9), _take(resumed, 9)):  # crosses into the next epoch
        for key in arrays:
            np.testing.assert_array_equal(got[key], expected[key])
    assert resumed.state() == original.state()


def test_iterator_errors():
    with pytest.raises(DataError, match="one common length"):
        BatchIterator({"input_ids": np.zeros((4, 2)), "labels": np.zeros((5, 2))}, 2, process_count=1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchIterator(_arrays(rows=3), 4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not divisible"):
        BatchIterator(_arrays(), 6, process_index=0, process_count=4)
    with pytest.raises(DataError, match="does not fit"):
        BatchIterator(_arrays(), 8, process_index=0, process_count=1).restore({"epoch": 0, "position": 7,
                                                                              "seed": 0})


def test_too_few_examples_name_the_sources():
    with pytest.raises(DataError, match=r"^/data/a\.txt, b\.jsonl: 0 examples are fewer than one global batch of 8$"):
        BatchIterator(pretrain_dataset(np.zeros((0, 4), np.int32)), 8, process_index=0, process_count=1,
                      sources=["/data/a.txt", "b.jsonl"])


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


# --- instruction tuning ---------------------------------------------------------------------------------------

def reference_sft(records, tokenizer, max_seq_length):
    """build_dataset.py's tokenization(), as Chinese-Mixtral runs it."""
    sources, targets = [], []
    for record in records:
        instruction, input_text, output = record["instruction"], record["input"], record["output"]
        if input_text is not None and input_text != "":
            instruction = instruction + "\n" + input_text
        sources.append("[INST] {instruction} [/INST]".format_map({"instruction": instruction}))
        targets.append(f"{output}{tokenizer.eos_token}")
    tokenized_sources = tokenizer(sources, return_attention_mask=False)
    tokenized_targets = tokenizer(targets, return_attention_mask=False, add_special_tokens=False)
    examples = []
    for s, t in zip(tokenized_sources["input_ids"], tokenized_targets["input_ids"]):
        if len(s) >= max_seq_length:
            continue
        examples.append(((s + t)[:max_seq_length], ([-100] * len(s) + t)[:max_seq_length]))
    return examples


SFT_RECORDS = [
    {"instruction": "请介绍一下北京。", "input": "", "output": "北京是中国的首都，有三千多年的历史。"},
    {"instruction": "Summarize the text.", "input": "The quick brown fox jumps over the lazy dog.",
     "output": "A fox jumps over a dog."},
    {"instruction": "翻译成英文。", "input": "第一行\n第二行\n\n  第三行", "output": "Line one\nline two\n"},
    {"instruction": "说点什么。", "input": None, "output": ""},
    {"instruction": "Say hi.", "input": "", "output": " hi there  "},
    {"instruction": "计算 12+30 等于多少？", "input": "", "output": "12 + 30 = 42。😀"},
    {"instruction": "很长的问题" * 30, "input": "", "output": "答"},
    {"instruction": "写一首诗。", "input": "", "output": "床前明月光，疑是地上霜。" * 8},
    *hsk_instructions("heldout")[:4],
]


def test_sft_examples_equal_build_dataset(sp, hf):
    examples, dropped = build_sft(SFT_RECORDS, sp, max_length=64)
    assert examples == reference_sft(SFT_RECORDS, hf, 64)
    assert dropped == 1 and len(examples) == len(SFT_RECORDS) - 1
    empty_output = examples[3]
    assert empty_output[0][-1] == sp.eos_id and empty_output[1].count(-100) == len(empty_output[1]) - 1
    long_output = examples[6]
    assert len(long_output[0]) == len(long_output[1]) == 64 and sp.eos_id not in long_output[1]
    assert sft_example(sp, "很长的问题" * 30, "", "答", 64) is None


def test_transformers5_llama_class_drops_the_dummy_prefix_before_a_leading_space(tmp_path, sp):
    """transformers 5's LlamaTokenizer (what AutoTokenizer makes of a directory whose config names that class)
    gives an output that starts with a space one "▁" less than SentencePiece and transformers 4.37's
    LlamaTokenizer; everything else agrees."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(_hf_dir(tmp_path, tokenizer_class="LlamaTokenizer"))
    assert len(tok) == 32000
    ours, _ = build_sft(SFT_RECORDS, sp, max_length=64)
    theirs = reference_sft(SFT_RECORDS, tok, 64)
    assert SFT_RECORDS[4]["output"] == " hi there  "
    assert [e for i, e in enumerate(ours) if i != 4] == [e for i, e in enumerate(theirs) if i != 4]
    source = len(sp.encode("[INST] Say hi. [/INST]"))
    assert ours[4][0][source:] == [28705] + theirs[4][0][source:]  # "▁", "▁hi", ... against "▁hi", ...


def test_read_alpaca_list_lines_and_errors(tmp_path):
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps([{"instruction": "i", "input": "x", "output": "o"},
                                  {"instruction": "j", "output": "p"}], ensure_ascii=False))
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"instruction": "i", "input": null, "output": "o"}\n')
    assert read_alpaca(str(listed)) == [{"instruction": "i", "input": "x", "output": "o"},
                                        {"instruction": "j", "input": "", "output": "p"}]
    assert read_alpaca(str(lines)) == [{"instruction": "i", "input": "", "output": "o"}]
    listed.write_text(json.dumps([{"instruction": "i", "output": "o"}, {"instruction": "j"}]))
    with pytest.raises(DataError, match=r"a\.json: record 1: missing string field 'output'"):
        read_alpaca(str(listed))
    listed.write_text('[{"instruction": "i",\n "output": }]')
    with pytest.raises(DataError, match=r"a\.json:2: not valid JSON"):
        read_alpaca(str(listed))
    lines.write_text('{"instruction": "i", "output": "o"}\n{"output": "o"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: missing string field 'instruction'"):
        read_alpaca(str(lines))
    with pytest.raises(CorpusError, match="hsk-instructions, hsk-instructions-heldout"):
        read_alpaca("bundled:alpaca")


def test_pad_examples(sp):
    examples = [([1, 5, 6], [-100, 5, 6]), ([1, 7], [-100, 7])]
    out = pad_examples(examples, 4, pad_id=sp.eos_id)
    np.testing.assert_array_equal(out["input_ids"], [[1, 5, 6, 2], [1, 7, 2, 2]])
    np.testing.assert_array_equal(out["labels"], [[-100, 5, 6, -100], [-100, 7, -100, -100]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
    assert all(v.dtype == np.int32 for v in out.values())
    with pytest.raises(DataError, match="more than the row length 2"):
        pad_examples(examples, 2, pad_id=2)


def test_pack_examples_keeps_every_example_whole(sp):
    examples, _ = build_sft(hsk_instructions("heldout")[:40], sp, max_length=64)
    length = 96
    out = pack_examples(examples, length, pad_id=sp.eos_id)
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    rebuilt, rows = [], []
    for ids, labels, segments in zip(out["input_ids"], out["labels"], out["attention_mask"]):
        used = int(np.count_nonzero(segments))
        assert np.all(segments[:used] > 0) and np.all(segments[used:] == 0)  # padding only at the end
        assert np.all(ids[used:] == sp.eos_id) and np.all(labels[used:] == -100)
        assert np.all(np.diff(segments[:used]) >= 0) and set(segments[:used]) == set(range(1, segments.max() + 1))
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            assert labels[where][0] == -100  # no prediction across a segment boundary
            rebuilt.append((ids[where].tolist(), labels[where].tolist()))
        rows.append(used)
    assert rebuilt == examples  # in order, none split, every token accounted for
    assert len(rows) < len(examples)
    first_of_row = np.cumsum([0] + [int(s.max()) for s in out["attention_mask"]])[1:-1]
    for used, first in zip(rows, first_of_row):  # a new row starts only when the next example does not fit
        assert used + len(examples[first][0]) > length


# --- bundled corpora --------------------------------------------------------------------------------------------

def test_peoples_daily():
    train, heldout = peoples_daily("train"), peoples_daily("heldout")
    assert len(heldout) > 900 and len(train) > 17000
    assert not set(train) & set(heldout)
    assert peoples_daily("heldout") == heldout and list(read_texts("bundled:peoples-daily-heldout")) == heldout
    assert list(read_texts("bundled:peoples-daily"))[:50] == train[:50]
    tag = re.compile(r"/[A-Za-z]{1,3}\b")
    assert not any(tag.search(line) or " " in line for line in train + heldout)
    assert train[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert sorted(peoples_daily("all")) == sorted(train + heldout)
    with pytest.raises(CorpusError, match="unknown split 'test'"):
        peoples_daily("test")


def test_hsk_english():
    train, heldout = hsk_english("train"), hsk_english("heldout")
    assert len(train) // len(heldout) == HELDOUT_EVERY - 1 and list(read_texts("bundled:hsk-english")) == train
    assert list(read_texts("bundled:hsk-english-heldout")) == heldout
    assert all(line and line == line.strip() for line in train + heldout)
    with_chinese = [line for line in train + heldout if re.search("[\u4e00-\u9fff]", line)]
    assert len(with_chinese) < 0.01 * len(train)  # a few keep a character: "At New Year there's a 福 on the door."
    english_outputs = {r["output"] for r in hsk_instructions("heldout") if r["instruction"].startswith("把")}
    assert english_outputs <= set(heldout)  # the same held-out sentences as the instructions


def test_hsk_instructions():
    train, heldout = hsk_instructions("train"), hsk_instructions("heldout")
    assert len(train) + len(heldout) > 4300 and len(train) // len(heldout) == HELDOUT_EVERY - 1
    assert read_alpaca("bundled:hsk-instructions") == train and hsk_instructions("heldout") == heldout
    assert read_alpaca("bundled:hsk-instructions-heldout") == heldout
    for records in (train, heldout):
        assert {r["instruction"] for r in records} == {"把下面的句子翻译成英文。",
                                                      "Translate the following sentence into Chinese."}
        assert all(r["input"] and r["output"] for r in records)

    def chinese(records):
        return {r["input"] if r["instruction"].startswith("把") else r["output"] for r in records}
    assert not chinese(train) & chinese(heldout)


def test_replay_blocks_make_up_their_share_repeated_in_order():
    from train.data import mix_replay

    blocks, replay = np.arange(80).reshape(20, 4), 1000 + np.arange(12).reshape(3, 4)
    mixed = mix_replay(blocks, replay, 0.2)  # 20 blocks are 80%: 5 replay blocks, the 3 repeated in order
    assert mixed.shape == (25, 4) and (mixed[:20] == blocks).all()
    assert (mixed[20:] == replay[[0, 1, 2, 0, 1]]).all()
    assert mix_replay(blocks, replay, 0.0) is blocks
    with pytest.raises(DataError, match="no block"):
        mix_replay(blocks, replay[:0], 0.5)


def test_replay_sources_enter_training_sequences_only(tmp_path, sp):
    from train.config import load_config
    from train.loop import build_arrays

    config = load_config("pretrain_tiny", [f"run_dir={tmp_path}", "data.seq_len=32",
                                           "data.train=[bundled:peoples-daily-heldout]",
                                           "data.replay=[bundled:hsk-english-heldout]", "data.replay_share=0.25"])
    plain, _ = build_arrays(config, config.data.train, sp)
    mixed, _ = build_arrays(config, config.data.train, sp, replay=True)
    added = len(mixed["input_ids"]) - len(plain["input_ids"])
    assert added == round(len(plain["input_ids"]) / 3)  # a quarter of the whole
    english = {i for line in hsk_english("heldout") for i in sp.encode(line, add_bos=False)}
    assert set(mixed["input_ids"][-added:].ravel().tolist()) <= english | {sp.bos_id, sp.eos_id}
