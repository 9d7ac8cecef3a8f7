"""The embedded Mixtral tokenizer, HF tokenizer directories, and the [INST] chat format."""

from __future__ import annotations

import os
import shutil

import pytest

from mixtral_jax.data.tokenizer import (
    chat_ids,
    check_compatible,
    default_tokenizer_path,
    instruct_prompt,
    load_tokenizer,
)
from mixtral_jax.errors import TokenizerError

TEXTS = ["你好，世界！今天天气很好。", "Hello world, 中文 mixed 123", "  leading spaces\nand lines"]


def test_default_is_the_real_mixtral_tokenizer():
    tok = load_tokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("你好") == [1, 28705, 29383, 29530]
    for text in TEXTS[:2]:
        assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from transformers import LlamaTokenizer

    raw = tmp_path_factory.mktemp("sp")
    shutil.copy(default_tokenizer_path(), raw / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(raw))
    assert len(hf) == 32000  # transformers 5 builds an empty tokenizer from vocab_file=...; a directory works
    out = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(str(out))
    return str(raw), str(out)


def test_hf_directory_and_sentencepiece_file_encode_alike(hf_tokenizer_dir):
    raw, hf_dir = hf_tokenizer_dir
    default, from_sp_dir, from_hf = load_tokenizer(), load_tokenizer(raw), load_tokenizer(hf_dir)
    assert type(from_sp_dir).__name__ == "SentencePieceTokenizer" and type(from_hf).__name__ == "HFTokenizer"
    assert from_sp_dir.encode(TEXTS[2]) == default.encode(TEXTS[2])
    # transformers' fast Llama tokenizer splits runs of leading spaces differently from SentencePiece itself,
    # which is why the embedded default reads the .model file directly.
    for tok in (default, from_hf):  # pre-training's batch call: each line with BOS, and EOS when asked
        assert tok.encode_lines(TEXTS[:2], add_eos=True) == [tok.encode(t) + [tok.eos_id] for t in TEXTS[:2]]
        assert tok.encode_lines(TEXTS[:2], add_eos=False) == [tok.encode(t) for t in TEXTS[:2]]
    for text in TEXTS[:2]:
        assert from_hf.encode(text) == default.encode(text) == from_sp_dir.encode(text)
        assert from_hf.encode(text, add_bos=False) == default.encode(text, add_bos=False)


def test_chat_format_is_mixtral_instruct():
    tok = load_tokenizer()
    assert instruct_prompt("你好") == "[INST] 你好 [/INST]"
    ids = chat_ids(tok, [("你好", "你好！"), ("再见", None)])
    expected = ([1] + tok.encode("[INST] 你好 [/INST]", add_bos=False) + tok.encode("你好！", add_bos=False) + [2]
                + tok.encode("[INST] 再见 [/INST]", add_bos=False))
    assert ids == expected


def test_bad_paths_and_oversized_tokenizers_are_refused(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=str(junk)):
        load_tokenizer(str(junk))
    with pytest.raises(TokenizerError, match="vocab_size"):
        check_compatible(load_tokenizer(), 1000, "config.json")
    check_compatible(load_tokenizer(), 32000)
    assert os.path.isfile(default_tokenizer_path())
