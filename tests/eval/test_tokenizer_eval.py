"""eval tokenizer: the figures equal a direct count with sentencepiece; several tokenizers in one report."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece

from eval import tokenizer_eval
from mixtral_jax.data.tokenizer import default_tokenizer_path

ZH = ["在OSI参考模型中，负责路由选择的是网络层。", "光在真空中的速度约为每秒三十万公里。", "", "声音不能在真空中传播。"]
EN = ["Hello, teacher!", "The speed of light is about 300,000 km per second.", "Sound cannot travel in a vacuum."]


def direct(model_file, lines):
    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    lines = [line for line in lines if line.strip()]
    chars, tokens = sum(len(line) for line in lines), sum(len(ids) for ids in sp.encode(lines))
    return chars, tokens


@pytest.fixture(scope="module")
def small_sp(tmp_path_factory):
    """A second, much smaller SentencePiece model trained on the fixture text."""
    path = tmp_path_factory.mktemp("sp") / "small.model"
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter((ZH + EN) * 20), model_writer=buffer,
                                             vocab_size=120, model_type="bpe", character_coverage=1.0,
                                             minloglevel=2, hard_vocab_limit=False)
    path.write_bytes(buffer.getvalue())
    return str(path)


def test_figures_equal_direct_sentencepiece_count(tmp_path, small_sp, capsys):
    from mixtral_jax.cli.main import main

    (tmp_path / "zh.txt").write_text("\n".join(ZH) + "\n", encoding="utf-8")
    (tmp_path / "en.txt").write_text("\n".join(EN), encoding="utf-8")
    out = tmp_path / "tok.json"
    assert main(["eval", "tokenizer", "--tokenizer", default_tokenizer_path(), "--tokenizer", small_sp,
                 "--text", f"chinese={tmp_path / 'zh.txt'}", "--text", str(tmp_path / "en.txt"),
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert list(result["tokenizers"]) == [default_tokenizer_path(), small_sp]
    for model_file in (default_tokenizer_path(), small_sp):
        figures = result["tokenizers"][model_file]["texts"]
        assert list(figures) == ["chinese", "en.txt"]
        for name, lines in (("chinese", ZH), ("en.txt", EN)):
            chars, tokens = direct(model_file, lines)
            m = figures[name]
            assert (m["lines"], m["characters"], m["tokens"]) == (len([x for x in lines if x]), chars, tokens)
            assert m["tokens_per_char"] == pytest.approx(tokens / chars)
            assert m["chars_per_token"] == pytest.approx(chars / tokens)
    mixtral, small = (result["tokenizers"][p]["texts"]["chinese"]["tokens"] for p in (default_tokenizer_path(),
                                                                                        small_sp))
    assert mixtral != small  # two different tokenizers really were measured
    table = capsys.readouterr().out
    assert table.count("\n") == 2 + 4 and f"| {small_sp} |" in table


def test_default_texts_are_chinese_and_english():
    texts = tokenizer_eval.parse_text_args(None, max_lines=50)
    (zh_name, zh), (en_name, en) = texts.items()
    assert zh_name.startswith("zh") and en_name.startswith("en") and len(zh) == len(en) == 50
    assert "/" not in zh[0] and zh[0].startswith("迈向充满希望的新世纪")  # POS tags stripped
    assert all(ord(c) < 0x3000 for line in en for c in line)
    chars, tokens = direct(default_tokenizer_path(), zh)
    from mixtral_jax.data.tokenizer import load_tokenizer

    m = tokenizer_eval.measure(load_tokenizer(None), zh)
    assert (m["characters"], m["tokens"]) == (chars, tokens)


def test_missing_text_file_is_a_clear_error(tmp_path, capsys):
    from mixtral_jax.cli.main import main

    assert main(["eval", "tokenizer", "--text", str(tmp_path / "nope.txt"), "--quiet"]) == 2
    assert "nope.txt: no such text file" in capsys.readouterr().err
