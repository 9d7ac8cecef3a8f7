"""The bundled corpora: sizes, splits, cleaning."""

from __future__ import annotations

import re

import pytest

from mixtral_jax.data.corpora import (
    HELDOUT_EVERY,
    CorpusError,
    hsk_english,
    hsk_instructions,
    peoples_daily,
)
from mixtral_jax.data.sft import read_alpaca
from mixtral_jax.data.texts import read_texts


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


