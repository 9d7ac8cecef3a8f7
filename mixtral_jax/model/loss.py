"""The training objective: next-token cross-entropy plus the router's load-balancing loss."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # labels that do not count (prompt tokens in SFT, padding), as in transformers


def next_token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed NLL (fp32) of labels[:, 1:] under logits[:, :-1] over labels != -100, and the count of those."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean NLL of labels[:, 1:] under logits[:, :-1] over labels != -100, and the count of those."""
    total, count = next_token_nll(logits, labels)
    return total / jnp.maximum(count, 1), count


def blockwise_token_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        chunk: int) -> tuple[jax.Array, jax.Array]:
    """([n] fp32 -log p(targets), [n] whether each target is the argmax) from final hidden states [n, D] and
    the head [D, V], `chunk` rows of logits at a time, so the [n, V] logits never exist whole. Under jit an
    unused second output costs nothing."""
    blocked_hidden, blocked_targets, _ = _in_chunks(hidden[None], targets[None], None, chunk)

    def block_nll(inputs):
        h, t = inputs
        logits, _, nll = _chunk_nll(h, head, t)
        return nll, jnp.argmax(logits, -1) == t

    nll, greedy = jax.lax.map(block_nll, (blocked_hidden, blocked_targets))
    n = targets.shape[0]
    return nll.reshape(-1)[:n], greedy.reshape(-1)[:n]


def fused_next_token_nll(hidden: jax.Array, head: jax.Array, labels: jax.Array, *, chunk_rows: int = 128,
                         head_grad: bool = True) -> tuple[jax.Array, jax.Array]:
    """`next_token_nll(hidden @ head, labels)` from hidden [B, T, D] and head [D, V], without the [B, T, V]
    logits (fused linear cross-entropy).

    The logits of about `chunk_rows` rows at a time (chunk_rows / B positions of every row) are computed,
    turned into the loss and at once into their gradient (softmax - one-hot), which is multiplied back into
    the gradients of `hidden` and (with `head_grad`) of `head`; the backward pass only scales those. The same
    three products as autodiff of the whole logits, but the [B, T, V] logits and their gradient (a
    32,000-wide vocabulary makes them larger than the rest of a small model's activations) are never
    written: each chunk's stay in cache. The batch axis stays whole, so a batch sharded over a mesh stays
    sharded. `head_grad=False` (a frozen LM head, as in LoRA) skips the head's gradient product; the head
    then gets a zero gradient.
    """
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    positions = max(1, chunk_rows // hidden.shape[0])
    total = _fused_nll(hidden[:, :-1], head, jnp.where(valid, targets, 0), valid, positions, head_grad)
    return total, jnp.sum(valid)


def _chunk_nll(h, head, t):
    """One chunk's fp32 logits [..., V], their log-normaliser and -log p(t), from rows h [..., D]."""
    logits = jnp.einsum("...d,dv->...v", h, head).astype(jnp.float32)
    log_normaliser = jax.nn.logsumexp(logits, -1)
    return logits, log_normaliser, log_normaliser - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]


def _in_chunks(rows, targets, valid, chunk):
    """rows [B, n, D], targets [B, n] (and valid [B, n]), the positions padded to whole chunks and cut into
    [blocks, B, chunk, ...] (padding is not valid)."""
    n = targets.shape[1]
    blocks = -(-n // chunk)
    pad = ((0, 0), (0, blocks * chunk - n))

    def cut(x):
        x = jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], blocks, chunk, *x.shape[2:]), 1, 0)

    return cut(rows), cut(targets), None if valid is None else cut(valid)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_nll(rows, head, targets, valid, chunk, head_grad):
    blocked_rows, blocked_targets, blocked_valid = _in_chunks(rows, targets, valid, chunk)

    def block_nll(inputs):
        h, t, v = inputs
        return jnp.sum(jnp.where(v, _chunk_nll(h, head, t)[2], 0.0))

    return jnp.sum(jax.lax.map(block_nll, (blocked_rows, blocked_targets, blocked_valid)))


def _fused_nll_forward(rows, head, targets, valid, chunk, head_grad):
    batch, n, width = rows.shape
    vocab = head.shape[1]
    blocked_rows, blocked_targets, blocked_valid = _in_chunks(rows, targets, valid, chunk)

    def block(head_gradient, inputs):
        h, t, v = inputs
        logits, log_normaliser, nll = _chunk_nll(h, head, t)
        nll = jnp.where(v, nll, 0.0)
        is_target = jnp.arange(vocab) == t[..., None]
        logits_gradient = jnp.where(v[..., None], jnp.exp(logits - log_normaliser[..., None]) - is_target, 0.0)
        logits_gradient = logits_gradient.astype(h.dtype)
        rows_gradient = jnp.einsum("btv,dv->btd", logits_gradient, head)
        if head_grad:
            head_gradient = head_gradient + jnp.einsum("btd,btv->dv", h, logits_gradient,
                                                       preferred_element_type=jnp.float32)
        return head_gradient, (jnp.sum(nll), rows_gradient)

    start = jnp.zeros(head.shape, jnp.float32) if head_grad else None
    head_gradient, (nll, rows_gradient) = jax.lax.scan(block, start, (blocked_rows, blocked_targets, blocked_valid))
    rows_gradient = jnp.moveaxis(rows_gradient, 0, 1).reshape(batch, -1, width)[:, :n]
    head_gradient = None if head_gradient is None else head_gradient.astype(head.dtype)
    return jnp.sum(nll), (rows_gradient, head_gradient)


def _fused_nll_backward(chunk, head_grad, residuals, g):
    rows_gradient, head_gradient = residuals
    head_cotangent = None if head_gradient is None else g.astype(head_gradient.dtype) * head_gradient
    return g.astype(rows_gradient.dtype) * rows_gradient, head_cotangent, None, None


_fused_nll.defvjp(_fused_nll_forward, _fused_nll_backward)
