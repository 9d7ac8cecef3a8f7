"""Sharding over a simulated mesh of 8 CPU devices: the sharded model computes what one device does."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.parallel import sharding
from train.step import make_train_step

CONFIG = mj.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                          capacity_factor=8.0)  # capacity = sequence length: nothing dropped, so backends agree
MESHES = ["data=8", "fsdp=8", "expert=8", "data=2,expert=4", "fsdp=2,expert=2,tensor=2", "data=2,fsdp=2,expert=2"]
BATCH = 8, 16


@pytest.fixture(scope="module")
def batch():
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, BATCH).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    return {"input_ids": ids, "labels": np.where(mask == 1, ids, -100), "attention_mask": mask}


@pytest.fixture(scope="module")
def single_device(batch):
    """Loss, aux loss and gradients on one device with the dense backend, the reference for every mesh."""
    model = mj.Mixtral(CONFIG.replace(moe_backend="dense"), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    step = make_train_step(model, optax.sgd(0.1), mesh, BATCH)
    grads, metrics = step.grads(*_with_batch(step.split(model), batch), None)
    return jax.device_get(grads), jax.device_get(metrics)


def _with_batch(split, batch):
    params, frozen = split
    return params, batch, frozen


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["capacity", "dropless"])
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_loss_and_gradients_equal_one_device(single_device, batch, spec, backend):
    ref_grads, ref_metrics = single_device
    model = mj.Mixtral(CONFIG.replace(moe_backend=backend), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(spec, config=CONFIG)
    step = make_train_step(model, optax.sgd(0.1), mesh, BATCH)
    params, frozen = step.split(model)
    grads, metrics = step.grads(params, batch, frozen, None)
    evaluated = step.evaluate(params, batch, frozen)
    for key in ("loss", "aux_loss"):
        assert abs(float(metrics[key]) - float(ref_metrics[key])) < 1e-5, key
        assert abs(float(evaluated[key]) - float(ref_metrics[key])) < 1e-5, key
    for (path, ours), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_expert_weights_are_split_over_the_expert_axis():
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh("data=2,expert=4", config=CONFIG)
    sharding.shard_model(model, mesh)
    w1 = model.layers.block_sparse_moe.w1[...]  # [L, E, D, F]
    shapes = {shard.data.shape for shard in w1.addressable_shards}
    assert shapes == {(2, 2, 64, 32)} and len(w1.addressable_shards) == 8
    assert len({shard.device for shard in w1.addressable_shards}) == 8
    embed = model.embed_tokens[...]
    assert {shard.data.shape for shard in embed.addressable_shards} == {(128, 64)}  # no fsdp/tensor: replicated


@pytest.mark.slow
def test_a_sharded_train_step_updates_like_one_device(batch):
    """Two optimizer steps with momentum and weight decay, the optimizer state sharded like the parameters.
    (Adam would turn rounding-level gradient differences of near-zero entries into +-lr updates.)"""
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(0.1), optax.sgd(0.1, 0.9))
    results = []
    for spec in ("data=1", "fsdp=2,expert=2,tensor=2"):
        model = mj.Mixtral(CONFIG.replace(moe_backend="dropless"), rngs=nnx.Rngs(0))
        devices = jax.devices()[:1] if spec == "data=1" else None
        mesh = sharding.make_mesh(spec, devices=devices, config=CONFIG)
        step = make_train_step(model, optimizer, mesh, BATCH)
        params, frozen = step.split(model)
        params, opt_state, metrics = step.step(params, step.init_opt_state(params), batch, frozen, None)
        params, _, metrics = step.step(params, opt_state, batch, frozen, None)
        results.append((jax.device_get(params), float(metrics["loss"])))
    (single, loss_single), (sharded, loss_sharded) = results
    assert abs(loss_single - loss_sharded) < 1e-5
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_from_pretrained_places_each_parameter_on_the_mesh(reference_dirs):
    _, directory = reference_dirs("gqa4_top2_window")
    mesh = sharding.make_mesh("fsdp=2,expert=4")
    model = mj.from_pretrained(directory, mesh=mesh)
    w2 = model.layers.block_sparse_moe.w2[...]
    assert w2.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, "fsdp")
    assert {s.data.shape for s in w2.addressable_shards} == {(2, 2, 32, 32)}
    plain = mj.from_pretrained(directory)
    ids = np.arange(12).reshape(2, 6) % 100
    np.testing.assert_allclose(np.asarray(model(ids).logits), np.asarray(plain(ids).logits), atol=1e-5)


@pytest.mark.parametrize("spec, message", [
    ("data=3", "8 are available"),
    ("data=-1,expert=-1", "at most one -1"),
    ("data=2,pipeline=4", "not axis=size"),
    ("expert=x", "not an integer"),
    ("data=-1,expert=3", "not divisible"),
])
def test_bad_mesh_specs_are_refused(spec, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(spec)


def test_expert_axis_must_divide_the_experts():
    with pytest.raises(sharding.MeshError, match="num_local_experts"):
        sharding.make_mesh("data=2,expert=4", config=CONFIG.replace(num_local_experts=6))
    assert sharding.parse_mesh_spec("data=2,expert=-1", 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


def test_logical_rules_skip_used_and_non_dividing_axes():
    mesh = sharding.make_mesh("data=2,fsdp=2,expert=2")
    rules = sharding.default_rules()
    spec = sharding.logical_to_spec(("batch", "length", "act_embed"), (8, 16, 64), mesh, rules)
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None, None)
    spec = sharding.logical_to_spec(("batch", None), (6, 3), mesh, rules)  # 6 is not divisible by 8
    assert spec == jax.sharding.PartitionSpec(("data",), None) or spec == jax.sharding.PartitionSpec("data", None)
    with pytest.raises(sharding.MeshError, match="unknown mesh axis"):
        sharding.parse_rules({"embed": "model"})
