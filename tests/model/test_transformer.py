"""The model against transformers' MixtralForCausalLM (fp32, CPU): logits, selected experts, aux loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import mixtral_jax as mj
from mixtral_jax.model.transformer import positions_in_segments
from tests.conftest import REFERENCE_CONFIGS

BACKENDS = [dict(moe_backend="dense"), dict(moe_backend="dropless", grouped_matmul="blocked", moe_block_size=4),
            dict(moe_backend="dropless", grouped_matmul="ragged_dot"), dict(moe_backend="capacity", capacity_factor=8.0)]  # capacity = sequence: nothing dropped
SEQ = 12


def _ids(vocab, batch=2, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


def _reference(model, ids, mask=None):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask),
                    output_router_logits=True)
    router = np.stack([r.numpy() for r in out.router_logits])  # [L, B*T, E]
    return out.logits.numpy(), router, float(out.aux_loss)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: "-".join(str(v) for v in b.values()))
@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_logits_experts_and_aux_loss_match_transformers(reference_dirs, name, backend):
    ref_model, directory = reference_dirs(name)
    ids = _ids(ref_model.config.vocab_size)
    ref_logits, ref_router, ref_aux = _reference(ref_model, ids)

    model = mj.from_pretrained(directory, **backend)
    out = model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)
    k = model.config.num_experts_per_tok
    ours_router = np.asarray(out.router_logits).reshape(ref_router.shape)
    np.testing.assert_array_equal(np.sort(np.argsort(-ours_router, -1)[..., :k], -1),
                                  np.sort(np.argsort(-ref_router, -1)[..., :k], -1))
    assert abs(float(out.aux_loss) - ref_aux) <= 1e-5
    assert int(out.dropped_tokens) == 0


@pytest.mark.slow
def test_padded_batch_matches_transformers_with_attention_mask(reference_dirs):
    ref_model, directory = reference_dirs("gqa4_top2_window")
    ids = _ids(ref_model.config.vocab_size, batch=3)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    ref_logits, _, ref_aux = _reference(ref_model, ids, mask)
    out = mj.from_pretrained(directory)(jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref_logits[real], atol=1e-4, rtol=0)
    assert abs(float(out.aux_loss) - ref_aux) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [4, 5])  # 5: T = 21 is not a multiple, the last block is padded
def test_chunked_attention_matches_transformers_on_a_padded_batch_with_sliding_window(reference_dirs, chunk):
    """Query blocks (attention_chunk), each with its own mask built from slots and segments, give the
    unchunked numbers (1e-5) and transformers' (1e-4), with left padding and a sliding window (5)."""
    ref_model, directory = reference_dirs("gqa4_top2_window")
    ids = _ids(ref_model.config.vocab_size, batch=3, seq=21)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :13] = 0
    ref_logits, _, _ = _reference(ref_model, ids, mask)
    real = mask.astype(bool)
    whole = mj.from_pretrained(directory, dtype="float32")(jnp.asarray(ids), jnp.asarray(mask))
    chunked_model = mj.from_pretrained(directory, dtype="float32", attention_chunk=chunk)
    assert chunked_model.config.attention_chunk == chunk
    chunked = chunked_model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(chunked.logits)[real], np.asarray(whole.logits)[real], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(chunked.logits)[real], ref_logits[real], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_chunked_attention_equals_the_whole_mask_on_packed_segments_and_a_cache():
    """The attention function itself, fp32, 1e-5: packed segments (1, 2, 3 and padding) and queries that
    start at cache slot 7 of a 32-slot buffer, so blocks see keys before their own rows."""
    from mixtral_jax.model.attention import attend, visibility

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 19, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 32, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 32, 2, 8)), jnp.float32)
    key_segments = np.zeros((2, 32), np.int32)
    key_segments[0, :26] = np.repeat([1, 2, 3], [8, 10, 8])
    key_segments[1, 3:26] = 1
    query_segments = key_segments[:, 7:26]
    slots = jnp.broadcast_to(7 + jnp.arange(19), (2, 19))
    for window in (None, 6):
        vis = visibility(slots, jnp.asarray(query_segments), jnp.asarray(key_segments), window)
        whole = attend(q, k, v, vis)
        for chunk in (1, 4, 7, 19):
            np.testing.assert_allclose(np.asarray(attend(q, k, v, vis, chunk)), np.asarray(whole),
                                       atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", [dict(scan_layers=False), dict(remat_policy="full"),
                                            dict(remat_policy="dots", scan_layers=False)])
def test_unrolled_and_rematerialised_layers_compute_the_same(reference_dirs, implementation):
    ref_model, directory = reference_dirs("mha_top1_hd16")
    ids = _ids(ref_model.config.vocab_size)
    ref_logits, _, _ = _reference(ref_model, ids)
    model = mj.from_pretrained(directory, **implementation)

    def loss(m):
        return jnp.mean(m(jnp.asarray(ids)).logits ** 2)

    value, grads = nnx.value_and_grad(loss)(model)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits), ref_logits, atol=1e-4, rtol=0)
    base = mj.from_pretrained(directory)
    base_value, base_grads = nnx.value_and_grad(loss)(base)
    np.testing.assert_allclose(float(value), float(base_value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_close_to_transformers_fp32(reference_dirs):
    ref_model, directory = reference_dirs("gqa2_top2")
    ids = _ids(ref_model.config.vocab_size)
    ref_logits, _, _ = _reference(ref_model, ids)
    out = mj.from_pretrained(directory, dtype="bfloat16")(jnp.asarray(ids))
    assert out.logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.logits, np.float32), ref_logits, atol=2e-2, rtol=0)


@pytest.mark.slow
def test_gradients_match_transformers(reference_dirs):
    """The training signal, not only the forward: d(loss)/d(weights) against torch autograd (1e-5)."""
    ref_model, directory = reference_dirs("gqa2_top2")
    ids = _ids(ref_model.config.vocab_size)
    ref_model.zero_grad()
    out = ref_model(torch.from_numpy(ids), labels=torch.from_numpy(ids), output_router_logits=True)
    out.loss.backward()

    model = mj.from_pretrained(directory, moe_backend="dropless", grouped_matmul="blocked", moe_block_size=4)

    def loss(m):
        o = m(jnp.asarray(ids))
        logits = o.logits[:, :-1].astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(ids)[:, 1:, None], -1)
        return jnp.mean(nll) + m.config.router_aux_loss_coef * o.aux_loss

    value, grads = nnx.value_and_grad(loss)(model)
    assert abs(float(value) - out.loss.item()) < 1e-5
    w1_ref = ref_model.model.layers[1].mlp.experts.gate_up_proj.grad[:, : model.config.intermediate_size]
    np.testing.assert_allclose(np.asarray(grads.layers.block_sparse_moe.w1[...])[1],
                               w1_ref.numpy().transpose(0, 2, 1), atol=1e-5)
    q_ref = ref_model.model.layers[0].self_attn.q_proj.weight.grad.numpy()
    np.testing.assert_allclose(np.asarray(grads.layers.self_attn.q_proj[...])[0].reshape(q_ref.shape[1], -1).T,
                               q_ref, atol=1e-5)
    gate_ref = ref_model.model.layers[0].mlp.gate.weight.grad.numpy()
    np.testing.assert_allclose(np.asarray(grads.layers.block_sparse_moe.gate[...])[0].T, gate_ref, atol=1e-5)


def test_load_balancing_loss_matches_transformers_and_uniform_router_gives_top_k():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 5, 8)).astype(np.float32)
    mask = np.ones((2, 5), np.int64)
    mask[0, :2] = 0
    ref = load_balancing_loss_func(tuple(torch.from_numpy(l.reshape(10, 8)) for l in logits), 8, 2,
                                   torch.from_numpy(mask))
    ours = mj.load_balancing_loss(jnp.asarray(logits), 2, jnp.asarray(mask))
    assert abs(float(ours) - float(ref)) < 1e-6
    # 8 tokens whose top-2 covers every expert exactly twice, with equal router probabilities per expert.
    balanced = np.full((1, 1, 8, 8), -5.0, np.float32)
    for t in range(8):
        balanced[0, 0, t, [t, (t + 1) % 8]] = 5.0
    assert abs(float(mj.load_balancing_loss(jnp.asarray(balanced), 2)) - 2.0) < 1e-5


def test_positions_restart_in_each_segment_and_equal_cumsum_for_plain_masks():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 2, 0, 2, 2]])
    np.testing.assert_array_equal(np.asarray(positions_in_segments(segments))[segments > 0],
                                  np.array([0, 1, 2, 0, 1, 0] + [0, 1, 2, 3, 4, 5] + [0, 1, 2, 0, 1, 2]))


@pytest.mark.slow
def test_packed_samples_compute_what_each_sample_computes_alone(reference_dirs):
    """Segment ids in attention_mask (packed SFT rows): no attention across samples, positions restart."""
    ref_model, directory = reference_dirs("gqa4_top2_window")
    model = mj.from_pretrained(directory)
    lengths = (5, 4, 2)
    ids = _ids(ref_model.config.vocab_size, batch=1, seq=sum(lengths) + 1)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [[0]])[None]
    packed = np.asarray(model(jnp.asarray(ids), jnp.asarray(segments)).logits)[0]
    start = 0
    for n in lengths:
        alone = np.asarray(model(jnp.asarray(ids[:, start:start + n])).logits)[0]
        np.testing.assert_allclose(packed[start:start + n], alone, atol=1e-5, rtol=0)
        start += n


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: "-".join(str(v) for v in b.values()))
@pytest.mark.parametrize("name,layer,expert", [("gqa2_top2", 1, 2), ("mha_top1_hd16", 0, 5), ("mqa_top3", 1, 0)])
def test_router_bias_minus_inf_switches_an_expert_off_as_transformers_does(reference_dirs, name, layer, expert,
                                                                         backend):
    """router_bias -inf at (layer, expert) == transformers with that layer's router logit of the expert at -inf
    (a forward hook on its `mlp.gate`, ahead of transformers' own output recorder, that adds -inf to the
    column and routes again from the biased logits)."""
    ref_model, directory = reference_dirs(name)
    cfg = ref_model.config
    ids = _ids(cfg.vocab_size, seed=3)
    _, plain_router, _ = _reference(ref_model, ids)
    k = cfg.num_experts_per_tok
    assert (np.argsort(-plain_router[layer], -1)[:, :k] == expert).any()  # the expert is used when it is on

    def switch_off(module, args, output):
        logits = output[0].clone()
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, indices = torch.topk(probs, module.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), indices

    handle = ref_model.model.layers[layer].mlp.gate.register_forward_hook(switch_off, prepend=True)
    try:
        ref_logits, ref_router, _ = _reference(ref_model, ids)
    finally:
        handle.remove()
    assert np.isneginf(ref_router[layer][:, expert]).all()  # the hook's logits are the ones recorded

    model = mj.from_pretrained(directory, **backend)
    bias = np.zeros((cfg.num_hidden_layers, cfg.num_local_experts), np.float32)
    bias[layer, expert] = -np.inf
    out = model(jnp.asarray(ids), router_bias=jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(out.logits), ref_logits, atol=1e-4, rtol=0)
    ours_router = np.asarray(out.router_logits).reshape(ref_router.shape)
    np.testing.assert_allclose(ours_router, ref_router, atol=1e-4, rtol=0)  # -inf in the same places
    ours_top = np.sort(np.argsort(-ours_router, -1, kind="stable")[..., :k], -1)
    np.testing.assert_array_equal(ours_top, np.sort(np.argsort(-ref_router, -1, kind="stable")[..., :k], -1))
    assert not (ours_top[layer] == expert).any()
    assert int(out.dropped_tokens) == 0
    assert np.isfinite(float(out.aux_loss))
    # The logits differ from the unbiased model's (the expert mattered), and a zero bias changes nothing.
    plain = model(jnp.asarray(ids))
    assert np.abs(np.asarray(plain.logits) - np.asarray(out.logits)).max() > 1e-3
    zero = model(jnp.asarray(ids), router_bias=jnp.zeros_like(jnp.asarray(bias)))
    np.testing.assert_array_equal(np.asarray(zero.logits), np.asarray(plain.logits))


# ------------------------------------------------------------------------------------------------ inputs
SMALL = mj.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
                         moe_backend="dense")


def _abstract_model() -> mj.Mixtral:
    """Shapes only: enough for inputs refused before any computation."""
    return nnx.eval_shape(lambda: mj.Mixtral(SMALL, rngs=nnx.Rngs(0)))


def test_token_batch_converts_host_inputs_and_one_sequence():
    from mixtral_jax.model.transformer import token_batch

    for value in ([[1, 2, 3]], [(1, 2, 3)], (1, 2, 3), [1, 2, 3], np.array([[1, 2, 3]]),
                  np.array([1, 2, 3], np.uint8), jnp.array([1, 2, 3])):
        ids, mask = token_batch(value, None, 64)
        assert isinstance(ids, jax.Array) and ids.shape == (1, 3) and mask is None
        np.testing.assert_array_equal(np.asarray(ids), [[1, 2, 3]])
    ids, mask = token_batch([1, 2, 3], [0, 1, 1], 64)
    assert mask.shape == (1, 3) and np.asarray(mask).tolist() == [[0, 1, 1]]
    ids, mask = token_batch([[1, 2]], [[True, False]], 64)
    assert mask.dtype == jnp.bool_
    ids, _ = token_batch(jnp.array([[1, 64, -1]]), None, 64)  # a JAX array: documented as unchecked
    np.testing.assert_array_equal(np.asarray(ids), [[1, 64, -1]])


@pytest.mark.parametrize("ids, message", [
    ([[1, 64]], r"input_ids: token id 64 is out of range \[0, 64\) \(vocab_size 64\)"),
    (np.array([[-1, 3]]), r"input_ids: token id -1 is out of range \[0, 64\)"),
    ([["中国", "的"]], "not text.*tokenize"),
    ("中国", "not text.*tokenize"),
    ([[1.0, 2.0]], "integer token ids, got float64"),
    ([[1, 2], [3]], "rows of different lengths"),
    (np.zeros((1, 2, 3), np.int32), r"\[batch, length\] or \[length\], got shape \(1, 2, 3\)"),
    (jnp.zeros((2,), jnp.float32), "integer token ids"),
], ids=["too-large", "negative", "text", "string", "floats", "ragged", "3-d", "jax-floats"])
def test_bad_host_inputs_are_refused_with_a_clear_message(ids, message):
    with pytest.raises(ValueError, match=message):
        _abstract_model()(ids)


def test_a_mask_must_fit_the_ids():
    model = _abstract_model()
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 2\) differs from input_ids shape \(1, 3\)"):
        model([[1, 2, 3]], [[1, 1]])
    with pytest.raises(ValueError, match="attention_mask must hold"):
        model([[1, 2, 3]], [["a", "b", "c"]])


@pytest.mark.slow
def test_lists_numpy_and_one_sequence_compute_what_an_array_does():
    """Host inputs become arrays, a [T] sequence is a batch of 1, a list mask is taken; a JAX array is not
    checked (no wait on the device) and runs, eagerly or under jit."""
    model = mj.Mixtral(SMALL, rngs=nnx.Rngs(0))
    expected = np.asarray(model(jnp.asarray([[1, 2, 3]], jnp.int32)).logits)
    for ids in ([[1, 2, 3]], [1, 2, 3], np.array([1, 2, 3], np.int64)):
        np.testing.assert_allclose(np.asarray(model(ids).logits), expected, atol=1e-6, rtol=0)
    padded = np.asarray(model([[7, 1, 2, 3]], [[0, 1, 1, 1]]).logits)  # left padding: the same real tokens
    np.testing.assert_allclose(padded[:, 1:], expected, atol=1e-5, rtol=0)
    assert model(jnp.array([[1, 64, 3]])).logits.shape == (1, 3, 64)
    assert jax.jit(lambda ids: model(ids).logits)(np.array([[1, 2, 3]])).shape == (1, 3, 64)
