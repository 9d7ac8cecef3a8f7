"""The training objective: next-token cross-entropy plus the router's load-balancing loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # labels that do not count (prompt tokens in SFT, padding), as in transformers


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean NLL of labels[:, 1:] under logits[:, :-1] (fp32), over labels != -100; and the count of those."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count


def training_loss(model, input_ids, labels, attention_mask=None, aux_loss_coef: float | None = None):
    """LM loss + coef x aux loss (coef from the model's config unless given); returns (loss, metrics)."""
    out = model(input_ids, attention_mask)
    lm_loss, tokens = next_token_loss(out.logits, labels)
    coef = model.config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    loss = lm_loss + coef * out.aux_loss
    return loss, {"loss": loss, "lm_loss": lm_loss, "aux_loss": out.aux_loss, "tokens": tokens,
                  "dropped_tokens": out.dropped_tokens}
