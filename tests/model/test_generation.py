"""Decoding with the KV cache against transformers' generate and logits processors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import mixtral_jax as mj
from mixtral_jax.model.generation import SamplingConfig, generate, process_logits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gqa4_top2_window", "mqa_top3"])
def test_greedy_32_tokens_identical_to_transformers(reference_dirs, name):
    ref_model, directory = reference_dirs(name)
    prompt = np.random.default_rng(1).integers(3, ref_model.config.vocab_size, (1, 9))
    with torch.no_grad():
        ref = ref_model.generate(torch.from_numpy(prompt), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, 9:].numpy()
    model = mj.from_pretrained(directory)
    ours = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=32), eos_token_id=-1)
    np.testing.assert_array_equal(ours[0], ref)


@pytest.mark.slow
def test_left_padded_batch_generates_what_each_prompt_does_alone(reference_dirs):
    _, directory = reference_dirs("gqa4_top2_window")
    model = mj.from_pretrained(directory)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 128, n) for n in (9, 4)]
    ids = np.zeros((2, 9), np.int32)
    mask = np.zeros((2, 9), bool)
    for row, p in enumerate(prompts):
        ids[row, 9 - len(p):], mask[row, 9 - len(p):] = p, True
    sampling = SamplingConfig(max_new_tokens=12)
    batched = generate(model, ids, mask, sampling, eos_token_id=-1)
    for row, p in enumerate(prompts):
        np.testing.assert_array_equal(batched[row], generate(model, p[None], sampling=sampling, eos_token_id=-1)[0])


@pytest.mark.slow
def test_rows_stop_at_eos_and_are_padded_with_it(reference_dirs):
    ref_model, directory = reference_dirs("gqa2_top2")
    model = mj.from_pretrained(directory)
    prompt = np.random.default_rng(3).integers(3, 128, (1, 6))
    free = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=10), eos_token_id=-1)[0]
    eos = int(free[3])  # pretend the 4th generated token is EOS
    stopped = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=10), eos_token_id=eos)[0]
    first = list(free).index(eos)
    np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
    assert (stopped[first:] == eos).all()


@pytest.mark.parametrize("sampling", [
    SamplingConfig(repetition_penalty=1.3),
    SamplingConfig(temperature=0.7, top_k=5),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=0.9, top_k=7, top_p=0.6, repetition_penalty=1.2),
], ids=["penalty", "temp-topk", "temp-topp", "all"])
def test_logits_processing_matches_transformers_processors(sampling):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    history = rng.integers(0, 50, (3, 6))
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, history, True, axis=1)
    ref = torch.from_numpy(logits.copy())
    ids = torch.from_numpy(history)
    if sampling.repetition_penalty != 1.0:
        ref = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)(ids, ref)
    if sampling.temperature > 0:
        ref = TemperatureLogitsWarper(sampling.temperature)(ids, ref)
        if sampling.top_k:
            ref = TopKLogitsWarper(sampling.top_k)(ids, ref)
        if sampling.top_p < 1:
            ref = TopPLogitsWarper(sampling.top_p)(ids, ref)
    ours = np.asarray(process_logits(jnp.asarray(logits), jnp.asarray(seen), sampling))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
    finite = ~np.isinf(ours)
    np.testing.assert_allclose(ours[finite], ref.numpy()[finite], rtol=1e-6)


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy(reference_dirs):
    _, directory = reference_dirs("gqa2_top2")
    model = mj.from_pretrained(directory)
    prompt = np.random.default_rng(5).integers(3, 128, (1, 5))
    hot = SamplingConfig(max_new_tokens=16, temperature=1.5, seed=7)
    first, again = (generate(model, prompt, sampling=hot, eos_token_id=-1) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=16, temperature=1.5, seed=8),
                     eos_token_id=-1)
    assert (first != other).any()
    greedy = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=16), eos_token_id=-1)
    top1 = generate(model, prompt, sampling=SamplingConfig(max_new_tokens=16, temperature=1.5, top_k=1, seed=3),
                    eos_token_id=-1)
    np.testing.assert_array_equal(top1, greedy)


def test_invalid_sampling_is_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


SMALL = mj.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                         moe_backend="dense")


@pytest.mark.parametrize("prompt, message", [
    (["中国的首都是"], "token ids, not text.*tokenize"),
    ("中国的首都是", "token ids, not text.*tokenize"),
    ([[]], r"generate: an empty prompt \(input_ids shape \(1, 0\)\); each prompt needs at least one token"),
    ([], "an empty prompt"),
    ([[1, 64]], r"token id 64 is out of range \[0, 64\)"),
], ids=["text", "string", "empty-row", "empty", "out-of-range"])
def test_text_empty_and_out_of_range_prompts_are_refused_clearly(prompt, message):
    from flax import nnx

    model = nnx.eval_shape(lambda: mj.Mixtral(SMALL, rngs=nnx.Rngs(0)))  # refused before any computation
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, sampling=SamplingConfig(max_new_tokens=2))


@pytest.mark.slow
def test_a_list_or_one_sequence_generates_as_a_batch_of_one():
    from flax import nnx

    model = mj.Mixtral(SMALL, rngs=nnx.Rngs(0))
    sampling = SamplingConfig(max_new_tokens=3)
    expected = generate(model, np.array([[1, 2, 3]], np.int32), sampling=sampling, eos_token_id=-1)
    for prompt in ([[1, 2, 3]], [1, 2, 3], np.array([1, 2, 3])):
        np.testing.assert_array_equal(generate(model, prompt, sampling=sampling, eos_token_id=-1), expected)
