"""The jitted train step, with explicit shardings for parameters, optimizer state and batch (pjit's form).

The loss is computed from the final hidden states by `fused_next_token_nll`, a chunk of logits at a time:
the [batch, length, vocab] logits are never materialised.

Only the `trainable` parameters (all of them, or LoRA adapters plus modules_to_save) get gradients and
optimizer state; the frozen rest is an input like the batch. The trainable parameters are held as fp32 master
weights (`master_dtype`) whatever the model's dtype, as MaxText, Megatron and torch AMP hold them: the forward
and backward run on a bf16 copy, the gradients come back in fp32, and an update smaller than bf16's
resolution of a weight still accumulates (a bf16-only update would be rounded away). A global batch of
`micro_batches * m` rows runs as `micro_batches` sequential micro-batches whose gradients are summed, so any
global batch fits any mesh.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.model.loss import fused_next_token_nll
from mixtral_jax.model.moe import expert_assignments
from mixtral_jax.parallel.sharding import named_sharding, param_shardings, use_mesh

BATCH_AXES = ("batch", "length")
BATCH_KEYS = ("input_ids", "labels", "attention_mask")


class TrainStep(NamedTuple):
    step: Callable             # (params, opt_state, batch, frozen, dropout_key|None) -> (params, opt_state, metrics)
    grads: Callable            # (params, batch, frozen, dropout_key|None) -> (grads, metrics)
    evaluate: Callable         # (params, batch, frozen) -> metrics, no gradients
    init_opt_state: Callable   # params -> opt_state, placed with its shardings
    split: Callable            # model -> (params, frozen), placed with their shardings
    param_shardings: nnx.State
    frozen_shardings: nnx.State
    opt_shardings: object
    batch_shardings: dict


class StepShardings(NamedTuple):
    """Where each input of the step lives: trainable and frozen weights by their rules, the optimizer state
    like the parameters it follows (its counts replicated), the batch over the batch axes."""

    params: nnx.State
    frozen: nnx.State
    opt: object
    batch: dict
    replicated: NamedSharding


def step_shardings(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                   batch_shape: tuple[int, int], rules, trainable) -> StepShardings:
    _, params, _ = nnx.split(model, trainable, ...)
    shardings = param_shardings(model, mesh, rules)
    p_shardings, f_shardings = nnx.state(shardings, trainable), nnx.state(shardings, nnx.Not(trainable))
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(optimizer.init, params)
    o_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt, p_shardings,
                                        transform_non_params=lambda _: replicated)
    b_shardings = {key: named_sharding(BATCH_AXES, batch_shape, mesh, rules) for key in BATCH_KEYS}
    return StepShardings(p_shardings, f_shardings, o_shardings, b_shardings, replicated)


def master_weights(params, master_dtype: str | None):
    """The trainable parameters as the step holds them: floating ones narrower than `master_dtype` widened
    to it (None: as they are)."""
    if master_dtype is None:
        return params
    dtype = jnp.dtype(master_dtype)

    def widen(x):
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(dtype) if floating and jnp.finfo(x.dtype).bits < jnp.finfo(dtype).bits else x

    return jax.tree.map(widen, params)


def in_dtypes(params, dtypes):
    """`params` cast to the model's own dtypes (the compute copy of master weights)."""
    return jax.tree.map(lambda x, dtype: x if x.dtype == dtype else x.astype(dtype), params, dtypes)


def make_loss_and_grads(model: nnx.Module, mesh: Mesh, rules, trainable, micro_batches: int,
                        aux_loss_coef: float) -> Callable:
    """(params, batch, frozen, dropout_key, with_grads=True) -> (summed grads or None, metrics): the batch
    runs as `micro_batches` sequential slices (a scan) whose gradients add up, each slice's loss already
    divided by the global batch's label count, so the sum is the full batch's mean. `params` may be master
    weights wider than the model's dtypes: the forward casts them, so gradients come back in their dtype."""
    graphdef, params, _ = nnx.split(model, trainable, ...)
    model_dtypes = jax.tree.map(lambda x: x.dtype, params)
    config = model.config
    # The LM head's own gradient product runs only when the head (or the embedding it is tied to) trains.
    head_trainable = ("embed_tokens" if config.tie_word_embeddings else "lm_head") in params

    def micro_loss(params, frozen, micro, total_tokens, dropout_key):
        with use_mesh(mesh, rules):
            merged = nnx.merge(graphdef, in_dtypes(params, model_dtypes), frozen)
            out = merged(micro["input_ids"], micro["attention_mask"], dropout_key=dropout_key, return_hidden=True)
            nll_sum, tokens = fused_next_token_nll(out.hidden_states, merged.output_head(), micro["labels"],
                                                   head_grad=head_trainable)
        loss = nll_sum / total_tokens + aux_loss_coef * out.aux_loss / micro_batches
        return loss, {"nll_sum": nll_sum, "tokens": tokens, "aux_loss": out.aux_loss / micro_batches,
                      "dropped_tokens": out.dropped_tokens,
                      "expert_tokens": expert_assignments(out.router_logits, config.num_experts_per_tok,
                                                          micro["attention_mask"] > 0)}

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def loss_and_grads(params, batch, frozen, dropout_key, with_grads=True):
        """dropout_key (a jax.random key) turns LoRA dropout on; each micro-batch folds in its index."""
        total_tokens = jnp.maximum(jnp.sum(batch["labels"][:, 1:] != -100), 1)
        micro_rows = batch["labels"].shape[0] // micro_batches
        micros = jax.tree.map(lambda a: a.reshape(micro_batches, micro_rows, *a.shape[1:]), batch)
        keys = None if dropout_key is None else jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(
            jnp.arange(micro_batches))

        def one_micro(grads, inputs):
            micro, key = inputs
            if with_grads:
                (_, metrics), micro_grads = grad_fn(params, frozen, micro, total_tokens, key)
                grads = jax.tree.map(jnp.add, grads, micro_grads)
            else:
                _, metrics = micro_loss(params, frozen, micro, total_tokens, key)
            return grads, metrics

        zeros = jax.tree.map(jnp.zeros_like, params) if with_grads else None
        grads, metrics = jax.lax.scan(one_micro, zeros, (micros, keys))
        lm_loss = jnp.sum(metrics["nll_sum"]) / total_tokens
        aux = jnp.sum(metrics["aux_loss"])
        summary = {"loss": lm_loss + aux_loss_coef * aux, "lm_loss": lm_loss, "aux_loss": aux,
                   "tokens": jnp.sum(metrics["tokens"]), "dropped_tokens": jnp.sum(metrics["dropped_tokens"]),
                   "expert_tokens": jnp.sum(metrics["expert_tokens"], axis=0)}
        return grads, summary

    return loss_and_grads


def make_train_step(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    batch_shape: tuple[int, int], rules=None, trainable=nnx.Param,
                    micro_batches: int = 1, aux_loss_coef: float | None = None,
                    master_dtype: str | None = "float32") -> TrainStep:
    """The step for `model`'s structure on `mesh`. A batch is a dict of `input_ids`, `labels` and
    `attention_mask`, each [batch, length], split over the data, fsdp and expert axes; `trainable` is an nnx
    filter. The loss is the next-token NLL averaged over every label of the global batch plus
    `aux_loss_coef` (default: the config's) x the router's aux loss averaged over the micro-batches.
    `split` gives the trainable parameters as master weights in `master_dtype` (None: the model's dtypes)."""
    if batch_shape[0] % micro_batches:
        raise ValueError(f"batch of {batch_shape[0]} rows is not divisible into {micro_batches} micro-batches")
    coef = model.config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
    loss_and_grads = make_loss_and_grads(model, mesh, rules, trainable, micro_batches, coef)
    p_shardings, f_shardings, o_shardings, b_shardings, replicated = step_shardings(
        model, optimizer, mesh, batch_shape, rules, trainable)

    def train_step(params, opt_state, batch, frozen, dropout_key):
        grads, metrics = loss_and_grads(params, batch, frozen, dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    def split(model):
        _, params, frozen = nnx.split(model, trainable, ...)
        return (jax.device_put(master_weights(params, master_dtype), p_shardings),
                jax.device_put(frozen, f_shardings))

    return TrainStep(
        step=jax.jit(train_step, in_shardings=(p_shardings, o_shardings, b_shardings, f_shardings, None),
                     out_shardings=(p_shardings, o_shardings, replicated), donate_argnums=(0, 1)),
        grads=jax.jit(loss_and_grads,
                      in_shardings=(p_shardings, b_shardings, f_shardings, None),
                      out_shardings=(p_shardings, replicated)),
        evaluate=jax.jit(lambda params, batch, frozen: loss_and_grads(params, batch, frozen, None, False)[1],
                         in_shardings=(p_shardings, b_shardings, f_shardings), out_shardings=replicated),
        init_opt_state=jax.jit(optimizer.init, in_shardings=(p_shardings,), out_shardings=o_shardings),
        split=split, param_shardings=p_shardings, frozen_shardings=f_shardings, opt_shardings=o_shardings,
        batch_shardings=b_shardings)
