"""The lm-eval adapter against our own scorers (mcq, ppl, generation) and transformers' logits of the bundled
tiny model, and one lm-eval task run end to end offline (a local YAML over local JSON lines)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from eval import harness, mcq, ppl  # noqa: E402
from mixtral_jax.assets import TINY_MODEL_DIR  # noqa: E402
from mixtral_jax.data.tokenizer import load_tokenizer  # noqa: E402
from tests.eval.test_mcq import (  # noqa: E402
    DEV,
    MMLU_DEV,
    MMLU_SUBJECTS,
    MMLU_VAL,
    load_hf_tokenizer,
    load_models,
    write_fixture,
)


@pytest.fixture(scope="module")
def models():
    return load_models()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return load_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="module")
def lm(models):
    return harness.MixtralLM(models[0], load_tokenizer(None), batch=3, pad_multiple=128, progress=False)


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def transformers_loglikelihood(model, tok, context, continuation):
    """Direct: tokens of context+continuation (BOS first), the continuation being the tail beyond the
    context's tokens; sum of log_softmax at the positions predicting it, and whether each was the argmax."""
    whole = tok(context + continuation)["input_ids"]
    n = len(whole) - len(tok(context)["input_ids"]) if context else len(whole) - 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0, -n - 1:-1].float()
    logp = torch.log_softmax(logits, -1)
    target = torch.tensor(whole[-n:])
    return float(logp[torch.arange(n), target].sum()), bool((logits.argmax(-1) == target).all())


@pytest.mark.slow
def test_loglikelihood_equals_mcq_scorer_and_transformers(tmp_path, models, hf_tokenizer, lm):
    ours, theirs = models
    tokenizer = lm.tokenizer
    _, texts = mcq.build_prompts(write_fixture(tmp_path), None, 2, False)
    spaced, bare = mcq.choice_ids(tokenizer)
    letters = [" A", " B", " C", " D", "A", "B", "C", "D"]  # "▁X" then the bare "X" after "答案："
    got = lm.loglikelihood(requests("loglikelihood", [(t, x) for t in texts for x in letters]))
    ll = np.array([g[0] for g in got]).reshape(len(texts), 8)

    # the mcq scorer's candidate logits, shifted by each prompt's log-normaliser: same numbers, same letters
    prompt_ids = [tokenizer.encode(t) for t in texts]
    logits = mcq.candidate_logits(ours, prompt_ids, spaced + bare, batch=8, pad_multiple=64)
    shift = ll - logits
    assert np.ptp(shift, axis=1).max() < 1e-4 and (shift < 0).all()
    mcq_letters = mcq.option_scores(logits, prompt_ids, spaced + bare).argmax(-1)
    np.testing.assert_array_equal((ll[:, :4] + ll[:, 4:]).argmax(-1), mcq_letters)

    # and transformers' log-softmax, single- and multi-token continuations, an empty context (BOS)
    pairs = [(texts[0], x) for x in letters] + [(texts[3], "C\n\n以下"), (texts[5], " Paris is the capital"),
                                                ("", "北京是中国的首都。"), ("The answer is", " B ")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        want_logp, want_greedy = transformers_loglikelihood(theirs, hf_tokenizer, context, continuation)
        assert logp == pytest.approx(want_logp, abs=1e-4) and greedy == want_greedy
    np.testing.assert_allclose([g[0] for g in got[:8]], ll[0], atol=1e-5)  # batch-composition independent


@pytest.mark.slow
def test_loglikelihood_rolling_equals_ppl(models, hf_tokenizer):
    ours, theirs = models
    tokenizer = load_tokenizer(None)
    text = "\n".join([" ".join(r[1:]) for rows in DEV.values() for r in rows]
                     + [" ".join(r) for rows in MMLU_DEV.values() for r in rows])  # Chinese, then English
    for cut in range(len(text), 0, -1):  # a prefix whose length has a window size making windows line up
        ids = ppl.tokenize(tokenizer, text[:cut])
        length = next((w for w in range(24, 96) if (len(ids) - 1) % (w - 1) == 0), None)
        if length and len(ids) > 2 * length:
            text = text[:cut]
            break
    ids = ppl.tokenize(tokenizer, text)

    # ppl's windows of `length` tokens with stride length-1 (each later window scores its last length-1
    # tokens after one token of context) are lm-eval's disjoint rolling windows of max_length = length-1
    # (max_length inputs predicting max_length tokens, BOS the first context)
    windowed = ppl.perplexity(ours, ids, [length], stride=length - 1)
    whole = ppl.perplexity(ours, ids, [len(ids)])
    rolling = harness.MixtralLM(ours, tokenizer, batch=2, pad_multiple=16, max_length=length - 1,
                               progress=False)
    single = harness.MixtralLM(ours, tokenizer, batch=1, pad_multiple=16, progress=False)
    (got_windowed,) = rolling.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    (got_whole,) = single.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert windowed["tokens_scored"] == whole["tokens_scored"] == [len(ids) - 1]
    assert -got_windowed == pytest.approx(windowed["nll"][0] * (len(ids) - 1), rel=1e-5)
    assert -got_whole == pytest.approx(whole["nll"][0] * (len(ids) - 1), rel=1e-5)
    assert got_windowed != pytest.approx(got_whole, rel=1e-4)  # the windows do cut the context

    with torch.no_grad():  # transformers on the whole text
        logits = theirs(input_ids=torch.tensor([hf_tokenizer(text)["input_ids"]])).logits[0, :-1].float()
    target = torch.tensor(ids[1:].tolist())
    want = float(torch.log_softmax(logits, -1)[torch.arange(len(target)), target].sum())
    assert got_whole == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_generate_until_stops_at_until_and_matches_greedy(models, lm):
    from mixtral_jax.model.generation import SamplingConfig, generate

    ours = models[0]
    tokenizer = lm.tokenizer
    contexts = ["中国的首都是", "The quick brown fox jumps", "问题的答案："]
    ids = [tokenizer.encode(c) for c in contexts]
    assert len({len(i) for i in ids}) == 1  # one batch without padding: greedy decoding of each prompt alone
    greedy = []
    for tokens in generate(ours, ids, sampling=SamplingConfig(max_new_tokens=12)).tolist():
        greedy.append(tokens[: tokens.index(tokenizer.eos_id)] if tokenizer.eos_id in tokens else tokens)
    texts = [tokenizer.decode(g) for g in greedy]
    assert all(len(t) >= 6 for t in texts)
    stops = [[texts[0][3:5]], ["no such text", texts[1][2]], []]
    args = [(c, {"until": u, "max_gen_toks": 12, "do_sample": False}) for c, u in zip(contexts, stops)]
    args.append((contexts[0], {"until": "never", "max_gen_toks": 5}))  # another group: another length
    got = lm.generate_until(requests("generate_until", args))  # padded together with the other prompts
    assert got[:3] == [texts[0][: texts[0].index(stops[0][0])], texts[1][: texts[1].index(texts[1][2])], texts[2]]
    assert len(got[0]) < len(texts[0]) and len(got[1]) < len(texts[1])
    assert got[3] == tokenizer.decode(greedy[0][:5])  # greedy is prefix-consistent
    assert harness.cut_at_stops("abcabc", ["c", "", "b"]) == "a"


TASK_YAML = """task: tiny_mmlu_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_task_end_to_end_offline(tmp_path, models, monkeypatch, capsys):
    """A local YAML task over local JSON lines (no Hub): MMLU's 0-shot prompts with lm-eval's " X" choices.
    lm-eval's accuracy (argmax of the choices' loglikelihoods) equals mcq's MMLU accuracy (argmax of the
    logits of "▁X"), run through `mixtral-jax eval harness`."""
    from mixtral_jax.cli.main import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = write_fixture(tmp_path / "mmlu", "mmlu")
    questions, texts = mcq.build_prompts(data, None, 0, False)
    lines = [json.dumps({"prompt": t, "label": "ABCD".index(q.answer)}, ensure_ascii=False)
             for q, t in zip(questions, texts)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(data=tmp_path / "docs.jsonl"), encoding="utf-8")
    out = tmp_path / "res" / "harness.json"
    assert main(["eval", "harness", "--model", TINY_MODEL_DIR, "--tasks", "tiny_mmlu_local", "--include-path",
                 str(tmp_path / "tasks"), "--dtype", "float32", "--batch", "4", "--bootstrap-iters", "0",
                 "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    acc = result["results"]["tiny_mmlu_local"]["acc,none"]
    expected = mcq.evaluate(models[0], load_tokenizer(None), data, 0)
    assert expected["total"] == sum(len(MMLU_VAL[s]) for s in MMLU_SUBJECTS) == len(lines)
    assert acc == pytest.approx(expected["overall"] / 100)
    assert "tiny_mmlu_local" in capsys.readouterr().out
