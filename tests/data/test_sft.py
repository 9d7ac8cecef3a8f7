"""Instruction tuning examples against Chinese-Mixtral's build_dataset.py run through transformers."""

from __future__ import annotations

import json

import pytest

from mixtral_jax.data.corpora import CorpusError, hsk_instructions
from mixtral_jax.data.sft import build_sft, read_alpaca, sft_example
from mixtral_jax.data.texts import DataError
from tests.helpers.tokenizers import hf_tokenizer_dir


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

    tok = LlamaTokenizer.from_pretrained(hf_tokenizer_dir(tmp_path, tokenizer_class="LlamaTokenizer"))
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


