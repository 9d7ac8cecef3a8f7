"""The training objective: next-token cross-entropy plus the router's load-balancing loss."""

from __future__ import annotations

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
