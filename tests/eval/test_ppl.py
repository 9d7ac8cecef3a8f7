"""`mixtral-jax eval ppl`: perplexity vs context length on the bundled tiny model, against transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import mixtral_jax as mj
from eval import ppl
from mixtral_jax.assets import TINY_MODEL_DIR

LENGTHS = (128, 256, 512, 1024, 2048, 4096)
MAX_WINDOWS = 2  # per length: enough to cover window boundaries, small enough to stay fast
HEAD_SCALE = 30.0
TEXT_TOKENS = 6200  # > 4096 + 2048: the strided run at 4096 (stride 2048) has two windows


@pytest.fixture(scope="module")
def text_ids():
    from mixtral_jax.data.tokenizer import load_tokenizer

    ids = ppl.tokenize(load_tokenizer(None), ppl.default_text()[:9000], TEXT_TOKENS)
    assert len(ids) == TEXT_TOKENS and ids[0] == 1 and (ids[1:] != 1).all()  # one BOS, at the start
    return ids


@pytest.fixture(scope="module")
def models():
    from transformers import MixtralForCausalLM

    ours = mj.from_pretrained(TINY_MODEL_DIR, dtype="float32", attention_chunk=1024)
    ref = MixtralForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    assert ours.config.max_position_embeddings == 4096
    # The random tiny model is nearly uniform (ppl ~ vocab, NLL spread 0.16): a head 30x larger in both
    # models spreads the logits so that a misaligned target or a wrong window changes the ppl by far more
    # than the tolerance.
    ours.lm_head.set_value(ours.lm_head[...] * HEAD_SCALE)
    with torch.no_grad():
        ref.lm_head.weight.mul_(HEAD_SCALE)
    return ours, ref


def _reference_windows(n_tokens, length, stride):
    """(start, first scored target) written out as transformers' perplexity guide loops (full windows only)."""
    if stride is None:
        return [(start, 1) for start in range(0, n_tokens - length + 1, length)][:MAX_WINDOWS]
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        if end - begin < length:
            break
        trg_len = end - prev_end  # the guide's labels[:-trg_len] = -100; target 0 has no logit before it
        out.append((begin, max(1, length - trg_len)))
        prev_end = end
    return out[:MAX_WINDOWS]


def _reference_ppl(ref, ids, length, stride):
    total, scored = 0.0, 0
    for start, first in _reference_windows(len(ids), length, stride):
        window = torch.from_numpy(ids[start: start + length].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(ref(window).logits[0, :-1].double(), -1)
        nll = -logp.gather(-1, window[0, 1:, None])[:, 0]
        total += float(nll[first - 1:].sum())
        scored += length - first
    return math.exp(total / scored), scored


@pytest.mark.slow
@pytest.mark.parametrize("strided", [False, True], ids=["non-overlapping", "stride-half"])
def test_ppl_per_length_equals_transformers(models, text_ids, strided):
    ours, ref = models
    for length in LENGTHS:
        stride = length // 2 if strided else None
        result = ppl.perplexity(ours, text_ids, [length], stride=stride, max_windows=MAX_WINDOWS)
        expected, scored = _reference_ppl(ref, text_ids, length, stride)
        assert result["lengths"] == [length] and result["tokens_scored"] == [scored]
        assert result["ppl"][0] == pytest.approx(expected, rel=1e-4), length
        assert abs(result["nll"][0] - math.log(expected)) < 1e-5, length
        assert result["tokens_per_s"][0] > 0


def test_windows_non_overlapping_and_strided():
    assert ppl.windows(10, 4) == [(0, 1), (4, 1)]
    assert ppl.windows(10, 4, stride=2) == [(0, 1), (2, 2), (4, 2), (6, 2)]
    assert ppl.windows(10, 4, stride=4) == ppl.windows(10, 4)
    assert ppl.windows(3, 4) == []
    with pytest.raises(ValueError):
        ppl.windows(10, 4, stride=5)


@pytest.mark.slow
def test_memory_at_4096_is_bounded_by_one_block(models):
    """XLA's temporary buffers of the compiled scorer at L = 4096 (fp32, batch 1).

    Bound, from the shapes: attention block scores [H, C, L] fp32 = 4 * 1024 * 4096 * 4 B = 64 MiB, at most
    two live (scores and probabilities); LM-head block logits [P, V] fp32 = 512 * 32000 * 4 B = 62.5 MiB, at
    most two live; plus 32 MiB for everything linear in L (activations, MoE routing, per-block masks).
    The unchunked attention needs [H, L, L] scores (256 MiB each) and [L, L] masks: at least 3x more.
    """
    ours, _ = models
    cfg = ours.config
    length, chunk, positions = 4096, cfg.attention_chunk, 512
    block_scores = cfg.num_attention_heads * chunk * length * 4
    block_logits = positions * cfg.vocab_size * 4
    bound = 2 * block_scores + 2 * block_logits + 32 * 2**20
    chunked = ppl.compile_window(ours, length, positions).memory_analysis().temp_size_in_bytes
    whole_model = mj.from_pretrained(TINY_MODEL_DIR, dtype="float32")
    whole = ppl.compile_window(whole_model, length, positions).memory_analysis().temp_size_in_bytes
    print(f"temp bytes at {length}: chunked {chunked / 2**20:.1f} MiB, unchunked {whole / 2**20:.1f} MiB, "
          f"bound {bound / 2**20:.1f} MiB")
    assert chunked < bound
    assert whole > 3 * chunked


@pytest.mark.slow
def test_cli_writes_json_table_and_png(tmp_path):
    from mixtral_jax.cli.main import main

    text = tmp_path / "zh.txt"
    text.write_text(ppl.default_text()[:1500], encoding="utf-8")
    out, table, png = tmp_path / "r" / "ppl.json", tmp_path / "ppl.md", tmp_path / "ppl.png"
    assert main(["eval", "ppl", "--model", TINY_MODEL_DIR, "--text", str(text), "--lengths", "64,128,100000",
                 "--stride", "32", "--max-windows", "2", "--dtype", "float32", "--out", str(out),
                 "--table", str(table), "--plot", str(png), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["lengths"] == [64, 128, 100000] and result["stride"] == 32
    assert result["tokens_scored"][:2] == [63 + 32, 127 + 32] and result["tokens_scored"][2] == 0
    assert all(p > 1 for p in result["ppl"][:2]) and result["ppl"][2] is None
    assert set(result) >= {"lengths", "ppl", "tokens_scored", "tokens_per_s"}
    assert "| 128 | 2 | 159 |" in table.read_text()
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # temporaries renamed, none left behind


def test_cli_rejects_a_stride_longer_than_a_length(tmp_path):
    from mixtral_jax.cli.main import main

    assert main(["eval", "ppl", "--model", TINY_MODEL_DIR, "--lengths", "64,128", "--stride", "100",
                 "--quiet"]) == 2


@pytest.mark.slow
def test_lines_are_documents_as_pre_training_tokenises_them(tmp_path):
    """--lines: BOS + line + EOS per non-empty line, the form pretrain_blocks feeds the trainer."""
    from mixtral_jax.cli.main import main
    from mixtral_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    lines = ["中国的首都是北京。", "", "Hello world.", "人民日报"]
    expected = [i for line in lines if line for i in [tokenizer.bos_id, *tokenizer.encode(line, add_bos=False),
                                                      tokenizer.eos_id]]
    assert ppl.tokenize(tokenizer, "\n".join(lines), lines=True).tolist() == expected
    assert ppl.tokenize(tokenizer, "\n".join(lines), max_tokens=5, lines=True).tolist() == expected[:5]
    text = tmp_path / "zh.txt"
    text.write_text("\n".join(ppl.default_text().splitlines()[:40]), encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--model", TINY_MODEL_DIR, "--text", str(text), "--lines", "--lengths", "64",
                 "--max-windows", "2", "--dtype", "float32", "--out", str(out), "--quiet"]) == 0
    ids = ppl.tokenize(tokenizer, text.read_text(encoding="utf-8"), lines=True)
    model = mj.from_pretrained(TINY_MODEL_DIR, "float32")
    direct = ppl.perplexity(model, ids, [64], max_windows=2)
    assert json.loads(out.read_text())["ppl"][0] == pytest.approx(direct["ppl"][0], rel=1e-5)
