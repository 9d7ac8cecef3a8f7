"""`mixtral-jax vocab extend` (Chinese-LLaMA's vocabulary extension) on the bundled tiny model with a small
SentencePiece model trained on People's Daily sentences: shorter Chinese encodings, old ids kept, transformers
reading the merged tokenizer like SentencePiece, old logits unchanged, new rows the mean, and the extended
model trained, exported and loaded by transformers."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
import sentencepiece
import torch
from flax import nnx

from mixtral_jax.assets import TINY_MODEL_DIR
from mixtral_jax.checkpoints.hf_model import save_pretrained
from mixtral_jax.checkpoints.pretrained import from_pretrained
from mixtral_jax.checkpoints.run_manifest import model_directory
from mixtral_jax.cli.main import main
from mixtral_jax.config import MixtralConfig
from mixtral_jax.data.corpora import peoples_daily
from mixtral_jax.data.tokenizer import (
    MIXTRAL_VOCAB_SIZE,
    default_tokenizer_path,
    load_tokenizer,
)
from mixtral_jax.data.vocab_extension import (
    extend_rows,
    merge_pieces,
    read_model,
    resize_vocab,
    train_sentencepiece,
)
from tests.checkpoints.test_hf_model import _logits, params_of
from tests.convert.test_convert import leftovers

V = MIXTRAL_VOCAB_SIZE
TRAIN_TEXTS = peoples_daily("train")[:3000]
HELDOUT = peoples_daily("heldout")[:300]
MIXED = ["Hello world, 中文 mixed 123 出现在", "你好，世界！今天天气很好。", "１９９８年 English text here."]
ENGLISH = ["The quick brown fox jumps over the lazy dog.", "Mixtral is a sparse mixture of experts, 2024."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "zh.txt"
    path.write_text("\n".join(TRAIN_TEXTS) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def extended(corpus, tmp_path_factory):
    """(directory, printed summary) of the bundled tiny model extended with a 4,000-piece Chinese model."""
    out = str(tmp_path_factory.mktemp("ext") / "tiny-ext")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["vocab", "extend", "--model", TINY_MODEL_DIR, "--texts", corpus, "--vocab-size", "4000",
                     "--out", out, "--quiet"]) == 0
    return out, json.loads(printed.getvalue())


def test_the_output_is_an_hf_directory_with_the_merged_tokenizer(extended):
    out, summary = extended
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(out))
    assert summary["base_pieces"] == V and summary["trained_pieces"] == 4000
    assert 0 < summary["added_pieces"] < 4000 and summary["vocab_size"] == V + summary["added_pieces"]
    assert summary["unreachable_added_pieces"] == 0  # a BPE model's pieces are all buildable by BPE
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == summary["vocab_size"]
    assert leftovers(out) == [os.path.basename(out)]


def test_extended_tokenizer_is_shorter_on_chinese_and_keeps_old_ids(extended):
    out, summary = extended
    base, ext = load_tokenizer(), load_tokenizer(model=out)  # a model directory's own tokenizer is picked up
    assert load_tokenizer(model=TINY_MODEL_DIR).path == base.path  # none of its own: Mixtral's
    assert ext.path == os.path.join(out, "tokenizer.model") and ext.vocab_size == summary["vocab_size"]
    old, new = read_model(default_tokenizer_path()), read_model(ext.path)
    assert [(p.piece, p.score, p.type) for p in new.pieces[:V]] == [(p.piece, p.score, p.type) for p in old.pieces]
    added = [p.piece for p in new.pieces[V:]]
    assert len(set(added)) == len(added) and not set(added) & {p.piece for p in old.pieces}
    before = [base.encode(t, add_bos=False) for t in HELDOUT]
    after = [ext.encode(t, add_bos=False) for t in HELDOUT]
    chars = sum(map(len, HELDOUT))
    assert sum(map(len, after)) / chars < 0.75 * sum(map(len, before)) / chars  # measured: 0.85 against 1.23
    assert any(i >= V for ids in after for i in ids)
    assert all(ext.decode(ids) == text for ids, text in zip(after, HELDOUT))
    for text in ENGLISH:  # new pieces rank after every old merge: text without Chinese encodes as before
        assert ext.encode(text) == base.encode(text)


@pytest.mark.slow
def test_transformers_reads_the_merged_tokenizer_like_sentencepiece(extended):
    from transformers import AutoTokenizer, LlamaTokenizer, LlamaTokenizerFast

    out, summary = extended
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    texts = HELDOUT + MIXED + ENGLISH
    expected = [sp.encode(t) for t in texts]
    for cls in (LlamaTokenizer, LlamaTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(out, local_files_only=True)
        assert len(tok) == summary["vocab_size"] and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
        assert [tok.encode(t, add_special_tokens=False) for t in texts] == expected, cls.__name__
        assert tok.encode(HELDOUT[0]) == [1, *expected[0]]  # a BOS, no EOS: Mixtral's settings
    hf = load_tokenizer(out)  # our loader on the directory: its HF files
    assert type(hf).__name__ == "HFTokenizer" and [hf.encode(t) for t in HELDOUT] == [[1, *e] for e in expected[:300]]


def test_chinese_llama_scores_would_make_transformers_disagree(tmp_path):
    """Why merge_pieces does not give new pieces score 0 as Chinese-LLaMA's script did: transformers orders
    merges by id, SentencePiece by score, and the two tokenizations part."""
    from transformers import LlamaTokenizerFast

    base = read_model(default_tokenizer_path())
    merged, _ = merge_pieces(base, train_sentencepiece(TRAIN_TEXTS, 4000, base))
    for piece in merged.pieces[V:]:
        piece.score = 0.0
    (tmp_path / "tokenizer.model").write_bytes(merged.SerializeToString())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = LlamaTokenizerFast.from_pretrained(str(tmp_path), local_files_only=True)
    differ = sum(tok.encode(t, add_special_tokens=False) != sp.encode(t) for t in HELDOUT)
    assert differ > len(HELDOUT) // 20


@nnx.jit
def _hidden(model, input_ids):
    return model(input_ids, return_hidden=True).hidden_states


def _ids(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 12)).astype(np.int32)


@pytest.mark.slow
def test_old_logits_are_unchanged_and_new_rows_are_the_mean(extended):
    out, summary = extended
    old, new = from_pretrained(TINY_MODEL_DIR, "float32"), from_pretrained(out, "float32")
    assert new.config == MixtralConfig.from_hf(TINY_MODEL_DIR, dtype="float32", param_dtype="float32",
                                               vocab_size=summary["vocab_size"])
    old_params, new_params = params_of(old), params_of(new)
    for name in old_params:
        if "embed_tokens" not in name and "lm_head" not in name:
            assert old_params[name].tobytes() == new_params[name].tobytes(), name
    # Stored in bf16 like the source: the new rows are the fp32 mean rounded to bf16.
    for name, axis in (("embed_tokens", 0), ("lm_head", 1)):
        before, after = np.asarray(getattr(old, name)[...]), np.asarray(getattr(new, name)[...])
        kept, grown = np.split(after, [V], axis=axis)
        np.testing.assert_array_equal(kept, before)
        mean = before.astype(np.float64).mean(axis=axis, keepdims=True)
        np.testing.assert_allclose(grown, np.broadcast_to(mean, grown.shape), rtol=2 ** -8, atol=1e-6)
    ids = _ids(V, 0)
    np.testing.assert_array_equal(_hidden(new, ids), _hidden(old, ids))  # bit for bit up to the LM head
    old_logits, new_logits = np.asarray(_logits(old, ids)), np.asarray(_logits(new, ids))
    assert new_logits.shape[-1] == summary["vocab_size"]
    # The head's old columns are the same bits; XLA's CPU matrix product blocks a wider head differently,
    # which moves some products by an ulp (1.5e-7 here), never more.
    np.testing.assert_allclose(new_logits[..., :V], old_logits, rtol=0, atol=1e-6)
    # Every new token scores what the mean old token would (the mean row, rounded to bf16).
    np.testing.assert_allclose(new_logits[..., V:], np.broadcast_to(old_logits.mean(-1, keepdims=True),
                                                                     new_logits[..., V:].shape), atol=2e-3)


def test_resizing_in_memory_gives_the_streamed_result(extended, tmp_path):
    out, summary = extended
    model = resize_vocab(from_pretrained(TINY_MODEL_DIR), summary["vocab_size"])
    assert model.config.vocab_size == model.layers.self_attn.config.vocab_size == summary["vocab_size"]
    save_pretrained(model, tmp_path / "memory")
    assert main(["convert", "verify", out, str(tmp_path / "memory")]) == 0


@pytest.mark.slow
def test_tied_embeddings_grow_once_and_keep_old_logits():
    from mixtral_jax.model.transformer import Mixtral

    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                           tie_word_embeddings=True, moe_backend="dense")
    model = Mixtral(config, rngs=nnx.Rngs(3))
    ids = _ids(96, 1)
    before, hidden, embed = np.asarray(_logits(model, ids)), _hidden(model, ids), np.asarray(model.embed_tokens[...])
    resize_vocab(model, 100)
    np.testing.assert_array_equal(_hidden(model, ids), hidden)
    np.testing.assert_allclose(np.asarray(_logits(model, ids))[..., :96], before, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model.embed_tokens[...])[96:], np.tile(embed.mean(0), (4, 1)), atol=1e-7)
    assert not hasattr(model, "lm_head")
    with pytest.raises(ValueError, match="smaller"):
        extend_rows(embed, 90, 0)


def test_transformers_loads_the_extended_model_with_matching_logits(extended):
    from transformers import MixtralForCausalLM

    out, summary = extended
    ids = _ids(summary["vocab_size"], 2)
    assert (ids >= V).any()
    hf = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(_logits(from_pretrained(out, "float32"), ids)), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_training_the_extended_model_then_exporting_it(extended, tmp_path):
    """`mixtral-jax train` with model.path at the extended directory tokenises with its tokenizer (more text
    per sequence) and trains it (in full: the lightest run; the QLoRA recipe builds the same model); the
    run's HF export carries the tokenizer and loads in transformers with our logits."""
    from transformers import MixtralForCausalLM

    from train import data as train_data
    from train import loop
    from train.config import load_config

    out, summary = extended
    data = tmp_path / "zh.txt"
    data.write_text("\n".join(HELDOUT[:120]) + "\n", encoding="utf-8")
    run_dir = str(tmp_path / "run")
    config = load_config("pretrain_tiny", [
        f"run_dir={run_dir}", f"model.path={out}", "model.quantize=none", "lora.enabled=false", "steps=2",
        "batch_size=8", "log_every=1", "save_every=2", "eval_every=0", "progress=false", "data.seq_len=32",
        f"data.train=[{data}]", "data.eval=[]", "peak_tflops=0.1"])
    lines = []
    result = loop.train(config, log=lines.append)
    assert result["end_step"] == 2
    sequences = {name: len(train_data.load_rows(config, [str(data)], tok)[0])
                 for name, tok in (("extended", load_tokenizer(model=out)), ("mixtral", load_tokenizer()))}
    assert sequences["extended"] < 0.8 * sequences["mixtral"]
    assert any(line.startswith(f"data: {sequences['extended']:,} training sequences") for line in lines), lines
    assert load_tokenizer(model=model_directory(run_dir)).path == os.path.join(out, "tokenizer.model")  # a run: its base's

    export = tmp_path / "export"
    assert main(["convert", "orbax-to-hf", run_dir, str(export), "--quiet"]) == 0
    assert read_model(str(export / "tokenizer.model")) == read_model(os.path.join(out, "tokenizer.model"))
    trained = from_pretrained(str(export), "float32")
    assert trained.config.vocab_size == summary["vocab_size"]
    assert np.abs(np.asarray(trained.embed_tokens[...]) - np.asarray(from_pretrained(out, "float32").embed_tokens[...])
                  ).max() > 0  # it trained
    ids = _ids(summary["vocab_size"], 3)
    hf = MixtralForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(_logits(trained, ids)), expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "suffix", "jsonl_field", "vocab_too_large", "mismatched_tokenizer",
                                  "existing"])
def test_bad_input_is_one_clear_error_and_no_output(case, extended, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["vocab", "extend", "--model", TINY_MODEL_DIR, "--texts", corpus, "--vocab-size", "4000", "--quiet"]
    if case == "missing":
        args[5], needle = str(tmp_path / "none.txt"), "none.txt: no .txt/.jsonl/.json files there"
    elif case == "suffix":
        (tmp_path / "zh.csv").write_text("a\n")
        args[5], needle = str(tmp_path / "zh.csv"), "zh.csv: unknown data file type"
    elif case == "jsonl_field":
        (tmp_path / "zh.jsonl").write_text('{"text": "你好"}\n{"content": "再见"}\n', encoding="utf-8")
        args[5], needle = str(tmp_path / "zh.jsonl"), "zh.jsonl:2: no string field 'text'"
    elif case == "vocab_too_large":
        args[7], needle = "900000", "--vocab-size"
    elif case == "mismatched_tokenizer":  # the extended model with Mixtral's tokenizer: ids would collide
        args[3], needle = extended[0], "field 'vocab_size' is"
        args += ["--tokenizer", default_tokenizer_path()]
    else:
        out.mkdir()
        needle = "already exists"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert leftovers(out) == (["out"] if case == "existing" else [])


def test_jsonl_and_bundled_sources(tmp_path, capsys):
    records = tmp_path / "zh.jsonl"
    records.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TRAIN_TEXTS[:1500]),
                       encoding="utf-8")
    out = tmp_path / "ext"
    assert main(["vocab", "extend", "--model", TINY_MODEL_DIR, "--texts", str(records), "--texts",
                 "bundled:peoples-daily-heldout", "--vocab-size", "4000", "--out", str(out), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["texts"] == 1500 + len(peoples_daily("heldout")) and summary["added_pieces"] > 0
