"""The jitted train step, with explicit shardings for parameters, optimizer state and batch (pjit's form)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.loss import training_loss
from mixtral_jax.sharding import named_sharding, param_shardings, use_mesh

BATCH_AXES = ("batch", "length")
BATCH_KEYS = ("input_ids", "labels", "attention_mask")


class TrainStep(NamedTuple):
    step: Callable             # (params, opt_state, batch) -> (params, opt_state, metrics); donates its inputs
    grads: Callable            # (params, batch) -> (grads, metrics)
    evaluate: Callable         # (params, batch) -> metrics, no gradients
    init_opt_state: Callable   # params -> opt_state, placed with its shardings
    param_shardings: nnx.State
    opt_shardings: object
    batch_shardings: dict


def make_train_step(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    batch_shape: tuple[int, int], rules=None) -> TrainStep:
    """The step for `model`'s structure on `mesh`. A batch is a dict of `input_ids`, `labels` and
    `attention_mask`, each [batch, length] and split over the data, fsdp and expert axes. Parameters are
    `nnx.split(model, nnx.Param)[1]`; the optimizer state is sharded like the parameters it mirrors."""
    graphdef, params = nnx.split(model, nnx.Param)
    p_shardings = nnx.state(param_shardings(model, mesh, rules), nnx.Param)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, params)
    o_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt, p_shardings,
                                        transform_non_params=lambda _: replicated)
    b_shardings = {key: named_sharding(BATCH_AXES, batch_shape, mesh, rules) for key in BATCH_KEYS}

    def loss_fn(params, batch):
        with use_mesh(mesh, rules):
            return training_loss(nnx.merge(graphdef, params), batch["input_ids"], batch["labels"],
                                 batch["attention_mask"])

    def loss_and_grads(params, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return grads, metrics

    def train_step(params, opt_state, batch):
        grads, metrics = loss_and_grads(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return TrainStep(
        step=jax.jit(train_step, in_shardings=(p_shardings, o_shardings, b_shardings),
                     out_shardings=(p_shardings, o_shardings, replicated), donate_argnums=(0, 1)),
        grads=jax.jit(loss_and_grads, in_shardings=(p_shardings, b_shardings),
                      out_shardings=(p_shardings, replicated)),
        evaluate=jax.jit(lambda params, batch: loss_fn(params, batch)[1], in_shardings=(p_shardings, b_shardings),
                         out_shardings=replicated),
        init_opt_state=jax.jit(optimizer.init, in_shardings=(p_shardings,), out_shardings=o_shardings),
        param_shardings=p_shardings, opt_shardings=o_shardings, batch_shardings=b_shardings)
