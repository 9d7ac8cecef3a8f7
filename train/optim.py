"""The paper's optimizer: AdamW (lr 1e-4, weight decay 0.1), cosine schedule with 5% warmup, clipping."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    total_steps: int = 1000
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_ratio < 1 or self.learning_rate <= 0:
            raise ValueError(f"optimizer: invalid settings {self}")


def schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 over warmup_ratio x total_steps, then cosine decay to 0 (transformers' cosine)."""
    warmup = max(1, int(round(config.warmup_ratio * config.total_steps))) if config.warmup_ratio else 0
    warmup = min(warmup, config.total_steps - 1)  # at least one step of decay (a one-step run has no warmup)
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, config.total_steps, 0.0)


def make_optimizer(config: OptimizerConfig = OptimizerConfig()) -> optax.GradientTransformation:
    """Moments in fp32 whatever the parameter dtype (adapters are fp32 anyway)."""
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay),
    )
