"""The expert-parallel dropless exchange: the ragged all-to-all's plan, its CPU emulation against the op's
documented semantics, the whole dispatch over it against the padded exchange, and the op in a TPU program."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import ConfigError
from mixtral_jax.kernels.select import expert_exchange_kind
from mixtral_jax.model.expert_parallel import emulated_ragged_all_to_all, ragged_plans
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.model.moe import SparseMoE
from mixtral_jax.parallel import sharding
from tests.model.test_lora import _randomise_b
from tests.model.test_moe import CONFIG


def _over_devices(fn, count, *stacked, axis="x"):
    """fn run by `count` devices along `axis`, each on its block of every stacked argument."""
    mesh = Mesh(np.array(jax.devices()[:count]), (axis,))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False))(*stacked)


def test_ragged_plans_on_known_counts():
    # Two shards of two experts; device d's rows per (shard, local expert):
    counts = np.array([[[1, 2], [0, 3]],      # device 0: 1 row for expert 0, 2 for 1, 0 for 2, 3 for 3
                       [[2, 0], [1, 1]]], np.int32)

    def plans(counts):
        dispatch, back, group_sizes = ragged_plans(counts, axis_name="expert")
        return (*dispatch, *back, group_sizes)

    out = [np.asarray(a).reshape(2, -1) for a in _over_devices(plans, 2, jnp.asarray(counts.reshape(4, 2)),
                                                               axis="expert")]
    # Shard 0 receives expert 0: 1 row from device 0, then 2 from device 1; expert 1: 2 rows from device 0.
    # Shard 1 receives expert 2: 1 row from device 1; expert 3: 3 rows from device 0, then 1 from device 1.
    expected = [[[0, 1, 3, 3], [0, 2, 2, 3]],      # dispatch input_offsets: where each slice starts in the sender
                [[1, 2, 0, 3], [2, 0, 1, 1]],      # send_sizes
                [[0, 3, 0, 1], [1, 5, 0, 4]],      # output_offsets: where it lands on its shard
                [[1, 2, 2, 0], [0, 3, 1, 1]],      # recv_sizes, by source then local expert
                [[0, 3, 1, 5], [0, 1, 0, 4]],      # back: the slices from where they landed ...
                [[1, 2, 2, 0], [0, 3, 1, 1]],
                [[0, 1, 0, 2], [3, 3, 2, 3]],      # ... to where they came from
                [[1, 2, 0, 3], [2, 0, 1, 1]],
                [[3, 2], [1, 4]]]                  # rows per local expert on each shard
    for ours, theirs in zip(out, expected):
        np.testing.assert_array_equal(ours, np.array(theirs))


def _numpy_ragged_all_to_all(operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes):
    """jax.lax.ragged_all_to_all's documentation, device by device: slice j of source `src` goes to device
    j // per, where it is received as slice src * per + j % per and written at the sender's output_offsets[j]."""
    devices = len(operands)
    per = len(input_offsets[0]) // devices
    results = [output.copy() for output in outputs]
    for dst in range(devices):
        for i in range(devices * per):
            src, j = i // per, dst * per + i % per
            data = operands[src][input_offsets[src][j]:input_offsets[src][j] + send_sizes[src][j]]
            results[dst][output_offsets[src][j]:output_offsets[src][j] + recv_sizes[dst][i]] = data
    return results


def _random_ragged_arguments(rng, devices, per, rows):
    """Slices of random sizes, laid out in random order with gaps on both senders and receivers."""
    sizes = rng.integers(0, 4, (devices, devices * per))                   # [src, j]: slice j's size

    def layout(slice_sizes):
        offsets, at = np.zeros(len(slice_sizes), np.int32), 0
        for s in rng.permutation(len(slice_sizes)):
            at += int(rng.integers(0, 2))
            offsets[s], at = at, at + slice_sizes[s]
        assert at <= rows
        return offsets

    input_offsets = np.stack([layout(sizes[src]) for src in range(devices)])
    # Receiver dst gets slice i = src * per + p, which is the source's slice j = dst * per + p.
    recv_sizes = np.stack([[sizes[i // per, dst * per + i % per] for i in range(devices * per)]
                           for dst in range(devices)])
    landing = np.stack([layout(recv_sizes[dst]) for dst in range(devices)])
    output_offsets = np.stack([[landing[j // per, src * per + j % per] for j in range(devices * per)]
                               for src in range(devices)])
    operands = rng.normal(size=(devices, rows, 3)).astype(np.float32)
    outputs = rng.normal(size=(devices, rows, 3)).astype(np.float32)
    return operands, outputs, input_offsets, sizes.astype(np.int32), output_offsets, recv_sizes.astype(np.int32)


def test_emulation_follows_the_documented_semantics_and_its_gradient_is_the_transpose():
    emulate = partial(emulated_ragged_all_to_all, axis_name="x")
    # The documentation's own example (an axis of size 2, 1-d data).
    example = [[1, 2, 2, 0, 3, 4, 0, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1], [0, 0, 1, 2], [1, 1, 2, 1]]
    out = _over_devices(emulate, 2, *(jnp.asarray(a, jnp.float32 if i < 2 else jnp.int32)
                                      for i, a in enumerate(example)))
    np.testing.assert_array_equal(np.asarray(out), [1, 3, 0, 0, 2, 2, 4, 0])

    args = _random_ragged_arguments(np.random.default_rng(0), devices=4, per=2, rows=40)
    expected = _numpy_ragged_all_to_all(*args)
    stacked = [jnp.asarray(a.reshape(-1, *a.shape[2:])) for a in args]
    np.testing.assert_array_equal(np.asarray(_over_devices(emulate, 4, *stacked)).reshape(4, 40, 3),
                                  np.stack(expected))

    # The op is linear in (operand, output): its gradient is right when <f(a, o), c> = <a, f*a c> + <o, f*o c>.
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=stacked[0].shape).astype(np.float32))

    def pairing(operand, output):
        return jnp.sum(_over_devices(emulate, 4, operand, output, *stacked[2:]) * cotangent)

    grad_operand, grad_output = jax.grad(pairing, argnums=(0, 1))(stacked[0], stacked[1])
    np.testing.assert_allclose(float(pairing(stacked[0], stacked[1])),
                               float(jnp.sum(stacked[0] * grad_operand) + jnp.sum(stacked[1] * grad_output)),
                               rtol=1e-5)
    assert float(jnp.abs(grad_operand).sum()) > 0 and float(jnp.abs(grad_output).sum()) > 0


def _moe_on_mesh(exchange, mesh_spec, router_bias):
    """A LoRA'd MoE layer on a mesh -> (its output, the gradients of a loss w.r.t. every parameter and x)."""
    config = CONFIG.replace(num_local_experts=8, expert_exchange=exchange)
    moe = SparseMoE(config, rngs=nnx.Rngs(0), lora=LoraConfig(rank=4, alpha=8.0))
    _randomise_b(moe)
    mesh = sharding.make_mesh(mesh_spec, config=config)
    graphdef, state = nnx.split(sharding.shard_model(moe, mesh))
    x = jax.random.normal(jax.random.key(2), (8, 5, 16))
    x = jax.device_put(x, sharding.named_sharding(("batch", None, None), x.shape, mesh))

    def loss(state, x):
        with sharding.use_mesh(mesh):
            out = nnx.merge(graphdef, state)(x, router_bias=router_bias)[0]
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return out, grads


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec, skewed", [("expert=8", False), ("data=2,expert=4", True),
                                               ("data=2,expert=2,tensor=2", False)])
def test_ragged_dispatch_equals_the_padded_one_with_gradients(mesh_spec, skewed):
    """Through the emulation (CPU). Skewed: every token picks experts 0 and 1, both on shard 0, whose receive
    buffer fills up exactly."""
    bias = jnp.zeros(8).at[:2].set(100.0) if skewed else None
    out, grads = _moe_on_mesh("ragged", mesh_spec, bias)
    expected_out, expected_grads = _moe_on_mesh("padded", mesh_spec, bias)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected_out), atol=1e-6)
    leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
    assert len(leaves) == len(expected_leaves) > 8  # x, gate, w1-w3 and their adapters
    for ours, theirs in zip(leaves, expected_leaves):
        assert float(jnp.abs(theirs).max()) > 0
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def _ragged_ops(text):
    """(operand, output) types of each ragged_all_to_all in a StableHLO module."""
    return re.findall(r"custom_call @ragged_all_to_all\(.*?\).*?: \((tensor<[^>]*>), (tensor<[^>]*>)", text)


@pytest.mark.slow
def test_the_program_lowered_for_tpu_holds_the_ragged_op_with_buffers_for_any_routing():
    config = CONFIG.replace(num_local_experts=8, expert_exchange="ragged")
    mesh = sharding.make_mesh("expert=8", config=config)
    graphdef, state = nnx.split(sharding.shard_model(SparseMoE(config, rngs=nnx.Rngs(0)), mesh))
    x = jax.device_put(jnp.ones((8, 5, 16)), sharding.named_sharding(("batch", None, None), (8, 5, 16), mesh))

    def loss(state, x):
        with sharding.use_mesh(mesh):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0])

    forward = jax.jit(loss).trace(state, x)
    # Per device: 5 tokens, 10 rows out; each shard (one expert) takes at most one row of each of 8 x 5 tokens.
    assert _ragged_ops(forward.lower(lowering_platforms=("tpu",)).as_text()) == [
        ("tensor<10x16xf32>", "tensor<40x16xf32>"), ("tensor<40x16xf32>", "tensor<10x16xf32>")]
    assert not _ragged_ops(forward.lower().as_text())  # on CPU the emulation runs
    backward = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(state, x)
    assert len(_ragged_ops(backward.lower(lowering_platforms=("tpu",)).as_text())) == 4


def test_expert_exchange_choice():
    assert expert_exchange_kind("auto") == "padded"  # these tests run on CPU
    assert expert_exchange_kind("ragged") == "ragged"
    assert MixtralConfig().expert_exchange == "auto"
    with pytest.raises(ConfigError, match="'expert_exchange' must be one of auto, ragged, padded"):
        CONFIG.replace(expert_exchange="sparse")
