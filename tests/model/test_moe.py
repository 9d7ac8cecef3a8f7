"""The MoE block: the router, the three expert backends and the blocked grouped product."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.moe import (
    SparseMoE,
    blocked_grouped_matmul,
    capacity_experts,
    dense_experts,
    expert_capacity,
    route,
)

CONFIG = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=2)


def _numpy_reference(x, gate, w1, w2, w3, k, keep=None):
    """Per token, per chosen expert, in float64: the definition of the MoE block."""
    logits = x @ gate
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        chosen = np.argsort(-probs[n])[:k]
        weights = probs[n, chosen] / probs[n, chosen].sum()
        for j, (e, w) in enumerate(zip(chosen, weights)):
            if keep is not None and not keep[n, j]:
                continue
            h = x[n] @ w1[e]
            out[n] += w * (((h / (1 + np.exp(-h))) * (x[n] @ w3[e])) @ w2[e])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", [dict(moe_backend="dense"),
                                     dict(moe_backend="dropless", grouped_matmul="blocked", moe_block_size=3),
                                     dict(moe_backend="dropless", grouped_matmul="ragged_dot"),
                                     dict(moe_backend="capacity", capacity_factor=3.0)])
def test_every_backend_computes_the_definition(backend):
    moe = SparseMoE(CONFIG.replace(**backend), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 16))
    out, logits, dropped = moe(x)
    params = [np.asarray(p[...], np.float64) for p in (moe.gate, moe.w1, moe.w2, moe.w3)]
    expected = _numpy_reference(np.asarray(x, np.float64).reshape(14, 16), *params, k=2)
    np.testing.assert_allclose(np.asarray(out).reshape(14, 16), expected, atol=1e-5)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7, 6)
    assert int(dropped) == 0


@pytest.mark.slow
def test_router_renormalises_top_k_of_the_softmax():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    ids, weights = route(logits, 2)
    probs = jax.nn.softmax(logits)[0]
    assert ids.tolist() == [[0, 1]]
    np.testing.assert_allclose(np.asarray(weights[0]), np.asarray(probs[:2] / probs[:2].sum()), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("block", [1, 4, 5, 64])
def test_blocked_grouped_matmul_equals_a_loop_over_groups(block):
    rng = np.random.default_rng(0)
    sizes = np.array([5, 0, 9, 1, 0, 7], np.int32)  # empty groups and sizes that do not divide the block
    rows = rng.normal(size=(sizes.sum(), 8)).astype(np.float32)
    weights = rng.normal(size=(6, 8, 3)).astype(np.float32)
    expected = np.concatenate([rows[s - n:s] @ weights[g] for g, (n, s) in enumerate(zip(sizes, np.cumsum(sizes)))])
    out = blocked_grouped_matmul(jnp.asarray(rows), jnp.asarray(weights), jnp.asarray(sizes), block)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)

    def total(r, w, fn):
        return jnp.sum(jnp.sin(fn(r, w)))

    ours = jax.grad(total, argnums=(0, 1))(jnp.asarray(rows), jnp.asarray(weights),
                                           lambda r, w: blocked_grouped_matmul(r, w, jnp.asarray(sizes), block))
    ref = jax.grad(total, argnums=(0, 1))(jnp.asarray(rows), jnp.asarray(weights),
                                          lambda r, w: jax.lax.ragged_dot(r, w, jnp.asarray(sizes)))
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_capacity_drops_late_assignments_and_counts_them():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 10, 16)).astype(np.float32)
    w1, w3 = (rng.normal(size=(6, 16, 24)).astype(np.float32) * 0.3 for _ in range(2))
    w2 = rng.normal(size=(6, 24, 16)).astype(np.float32) * 0.3
    ids = np.array([[[0, 1]] * 6 + [[2, 0]] * 4], np.int32)  # expert 0 wanted by all 10 tokens
    weights = np.full((1, 10, 2), 0.5, np.float32)
    capacity = expert_capacity(10, 2, 6, 1.2)
    assert capacity == 4
    out, dropped = capacity_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(w1),
                                    jnp.asarray(w2), jnp.asarray(w3), 1.2)
    # expert 0: tokens 0-3 kept, 4-9 dropped (6); expert 1: tokens 0-3 kept, 4-5 dropped (2); expert 2: all 4 kept.
    assert int(dropped) == 8
    keep = np.ones((1, 10, 2), bool)
    keep[0, 4:, :][ids[0, 4:] == 0] = False
    keep[0, 4:6, 1] = False
    kept_weights = np.where(keep, weights, 0)
    expected = dense_experts(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(kept_weights), jnp.asarray(w1),
                             jnp.asarray(w2), jnp.asarray(w3))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_expert_capacity_bounds():
    assert expert_capacity(1, 2, 8, 1.0) == 1  # decoding never drops: top-k experts are distinct
    assert expert_capacity(100, 2, 8, 1.25) == 32
    assert expert_capacity(10, 2, 8, 100.0) == 10  # an expert can take each token once at most


@pytest.mark.slow
def test_router_bias_minus_inf_on_an_unchosen_expert_changes_nothing_and_on_a_chosen_one_reroutes():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 8)).astype(np.float32))
    ids, weights = route(logits, 2)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    top = np.take_along_axis(probs, np.asarray(ids), -1)
    np.testing.assert_allclose(np.asarray(weights), top / top.sum(-1, keepdims=True), rtol=1e-6)
    # An expert made unchosen everywhere: lower its logits below every row's second best, then switch it off.
    low = logits.at[:, 3].set(-10.0)
    ids_low, weights_low = route(low, 2)
    assert not (np.asarray(ids_low) == 3).any()
    bias = jnp.zeros(8).at[3].set(-jnp.inf)
    ids_off, weights_off = route(low + bias, 2)
    np.testing.assert_array_equal(np.asarray(ids_off), np.asarray(ids_low))
    np.testing.assert_array_equal(np.asarray(weights_off), np.asarray(weights_low))  # bit for bit
    # Switching off a chosen expert: the next best takes its place, the other renormalise among themselves.
    ids_off, weights_off = route(logits + bias, 2)
    assert not (np.asarray(ids_off) == 3).any()
    masked = np.where(np.arange(8) == 3, 0.0, probs)
    expected_ids = np.sort(np.argsort(-masked, -1, kind="stable")[:, :2], -1)
    np.testing.assert_array_equal(np.sort(np.asarray(ids_off), -1), expected_ids)
    kept = np.take_along_axis(masked, np.asarray(ids_off), -1)
    np.testing.assert_allclose(np.asarray(weights_off), kept / kept.sum(-1, keepdims=True), rtol=1e-6)
