"""The paper's optimizer: AdamW (lr 1e-4, weight decay 0.1), cosine schedule with 5% warmup, clipping.

`make_optimizer` is the one factory: the trainer steps with it and `mixtral-jax plan` counts its state, so the
plan's optimizer bytes are what a run holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.config import OptimizerConfig


def schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_ratio x total_steps, then cosine decay to 0 (transformers' cosine)."""
    if total_steps < 1 or not 0 <= config.warmup_ratio < 1 or config.learning_rate <= 0:
        raise ValueError(f"optimizer: invalid settings {config} over {total_steps} steps")
    warmup = max(1, int(round(config.warmup_ratio * total_steps))) if config.warmup_ratio else 0
    warmup = min(warmup, total_steps - 1)  # at least one step of decay (a one-step run has no warmup)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total_steps, 0.0)


def state_in_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` with its state kept in `dtype` (fp32 moments for bf16 parameters); updates come back in the
    gradients' dtype. optax's adamw keeps `nu` in the parameters' dtype whatever `mu_dtype` says."""
    dtype = jnp.dtype(dtype)

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return inner.init(cast(params))

    def update(updates, state, params=None):
        new, state = inner.update(cast(updates), state, None if params is None else cast(params))
        return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

    return optax.GradientTransformation(init, update)


def master_dtype(config: OptimizerConfig) -> str | None:
    """The dtype the train step holds the trained weights in (None: the model's own)."""
    return None if config.master_dtype == "param" else config.master_dtype


def make_optimizer(config: OptimizerConfig = OptimizerConfig(), total_steps: int = 1000
                   ) -> optax.GradientTransformation:
    """Clipping then AdamW over the schedule, its moments in `config.state_dtype` (fp32 by default, whatever
    the parameter dtype: bf16 moments lose small updates; adapters are fp32 anyway)."""
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay),
    )
    return optimizer if config.state_dtype == "param" else state_in_dtype(optimizer, config.state_dtype)


__all__ = ["OptimizerConfig", "make_optimizer", "master_dtype", "schedule", "state_in_dtype"]
