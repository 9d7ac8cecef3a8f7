"""loss: the fused (chunked) cross-entropy equals the plain one over whole logits, in value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.model.loss import (
    blockwise_token_nll,
    fused_next_token_nll,
    next_token_nll,
)

B, T, D, V = 3, 11, 16, 50  # 10 scored positions per row: not a multiple of the chunks below


def _inputs(dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (B, T, D), dtype)
    head = (jax.random.normal(k2, (D, V)) * 0.3).astype(dtype)
    labels = jax.random.randint(k3, (B, T), 0, V).at[0, :5].set(-100).at[2, 7].set(-100)
    return hidden, head, labels


def _plain(hidden, head, labels):
    return next_token_nll(jnp.einsum("btd,dv->btv", hidden, head), labels)[0]


@pytest.mark.slow
@pytest.mark.parametrize("chunk_rows", [1, 6, 9, 64])
def test_fused_equals_plain_loss_and_gradients(chunk_rows):
    hidden, head, labels = _inputs()
    fused = lambda h, w: fused_next_token_nll(h, w, labels, chunk_rows=chunk_rows)[0]
    (loss, grads), (ref_loss, ref_grads) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head)
                                            for f in (fused, lambda h, w: _plain(h, w, labels)))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(grads[0][:, -1]).max()) == 0.0  # the last position predicts nothing
    assert int(fused_next_token_nll(hidden, head, labels)[1]) == int(jnp.sum(labels[:, 1:] != -100))


def test_fused_forward_alone_and_under_jit():
    hidden, head, labels = _inputs()
    np.testing.assert_allclose(jax.jit(lambda h, w: fused_next_token_nll(h, w, labels)[0])(hidden, head),
                               _plain(hidden, head, labels), rtol=1e-6)


def test_frozen_head_gets_no_gradient_product():
    hidden, head, labels = _inputs()
    fused = lambda h, w: fused_next_token_nll(h, w, labels, chunk_rows=6, head_grad=False)[0]
    d_hidden, d_head = jax.grad(fused, argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(d_hidden, jax.grad(_plain)(hidden, head, labels), rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(d_head).max()) == 0.0


@pytest.mark.slow
def test_bf16_matches_the_plain_bf16_loss():
    hidden, head, labels = _inputs(jnp.bfloat16)
    fused = lambda h, w: fused_next_token_nll(h, w, labels, chunk_rows=6)[0]
    (loss, grads), (ref_loss, ref_grads) = (jax.value_and_grad(f, argnums=(0, 1))(hidden, head)
                                            for f in (fused, lambda h, w: _plain(h, w, labels)))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)  # the same bf16 logits, summed in fp32
    for ours, ref in zip(grads, ref_grads):
        assert ours.dtype == ref.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=0.02, atol=2e-3)


def test_blockwise_token_nll_equals_log_softmax():
    hidden, head, labels = _inputs()
    rows, targets = hidden[0], labels[1]
    log_probs = jax.nn.log_softmax(rows @ head, axis=-1)
    nll, greedy = blockwise_token_nll(rows, head, targets, chunk=4)
    np.testing.assert_allclose(nll, -log_probs[jnp.arange(T), targets], rtol=1e-6)
    np.testing.assert_array_equal(greedy, jnp.argmax(log_probs, -1) == targets)
