"""LoRA adapters: a fresh adapter changes nothing; adapted = merged weights; expert adapters per expert."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.model.lora import (
    LoraConfig,
    LoRAParam,
    adapter_of,
    merge_adapters,
    merged,
)
from mixtral_jax.model.moe import SparseMoE
from mixtral_jax.parallel import sharding
from tests.model.test_moe import CONFIG, _numpy_reference

LORA = LoraConfig(rank=4, alpha=8.0)


def _randomise_b(model, seed=1):
    """Non-zero B everywhere (a fresh adapter has B = 0 and would hide any mistake)."""
    key = jax.random.key(seed)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, LoRAParam) and str(path[-1]).endswith("_lora_b"):
            key, sub = jax.random.split(key)
            variable.set_value(0.05 * jax.random.normal(sub, variable.get_value().shape))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dense", "dropless", "capacity"])
def test_fresh_adapters_leave_the_logits_unchanged(reference_dirs, backend):
    _, directory = reference_dirs("gqa2_top2")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 10)))
    base = mj.from_pretrained(directory, moe_backend=backend, capacity_factor=4.0)
    adapted = mj.from_pretrained(directory, moe_backend=backend, capacity_factor=4.0, lora=LORA)
    names = {str(p[-1]) for p, v in nnx.iter_graph(adapted) if isinstance(v, LoRAParam)}
    assert names == {f"{t}_lora_{ab}" for t in LORA.targets for ab in "ab"}
    np.testing.assert_array_equal(np.asarray(adapted(ids).logits), np.asarray(base(ids).logits))


@pytest.mark.slow
def test_adapted_model_equals_the_model_with_merged_weights(reference_dirs):
    _, directory = reference_dirs("mqa_top3")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 112, (2, 9)))
    adapted = mj.from_pretrained(directory, lora=LORA)
    _randomise_b(adapted)
    base = mj.from_pretrained(directory)
    modules = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "block_sparse_moe": ("gate", "w1", "w2", "w3")}
    for module_name, weights in modules.items():
        source, target = getattr(adapted.layers, module_name), getattr(base.layers, module_name)
        for name in weights:
            contracted = 2 if name == "o_proj" else 1
            getattr(target, name).set_value(merged(getattr(source, name)[...], adapter_of(source, name), contracted))
    ours, reference = np.asarray(adapted(ids).logits), np.asarray(base(ids).logits)
    assert np.abs(ours - np.asarray(mj.from_pretrained(directory)(ids).logits)).max() > 1e-3  # B matters
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec, backend", [(None, "dropless"), (None, "capacity"), (None, "dense"),
                                                 ("expert=8", "dropless"), ("data=2,expert=2,tensor=2", "dropless"),
                                                 ("expert=8", "capacity")])
def test_expert_adapters_equal_a_per_expert_loop(mesh_spec, backend):
    config = CONFIG.replace(num_local_experts=8, moe_backend=backend, capacity_factor=8.0)
    moe = SparseMoE(config, rngs=nnx.Rngs(0), lora=LORA)
    _randomise_b(moe)
    x = jax.random.normal(jax.random.key(2), (8, 5, 16))
    expected = _numpy_reference(
        np.asarray(x, np.float64).reshape(40, 16),
        *(np.asarray(merged(getattr(moe, n)[...], adapter_of(moe, n), 1), np.float64) for n in ("gate", "w1", "w2", "w3")),
        k=2)
    if mesh_spec is None:
        out = moe(x)[0]
    else:
        mesh = sharding.make_mesh(mesh_spec, config=config)
        sharding.shard_model(moe, mesh)
        assert {s.data.shape[0] for s in moe.w1_lora_a[...].addressable_shards} == {8 // mesh.shape["expert"]}

        @nnx.jit
        def run(moe, x):
            with sharding.use_mesh(mesh):
                return moe(x)[0]

        out = run(moe, jax.device_put(x, sharding.named_sharding(("batch", None, None), x.shape, mesh)))
    np.testing.assert_allclose(np.asarray(out).reshape(40, 16), expected, atol=1e-5)


def test_bad_lora_config_is_refused():
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("q_proj", "mlp"))
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(rank=0)


@pytest.mark.slow
@pytest.mark.parametrize("nf4", [False, True], ids=["full-precision", "nf4-base"])
def test_merge_adapters_folds_them_into_the_weights(reference_dirs, nf4):
    """merge_adapters gives a plain model (no LoRAParam left) computing what the adapted model computes; an
    NF4 base is dequantised first."""
    from mixtral_jax.model.nf4_base import quantize_base

    _, directory = reference_dirs("gqa2_top2")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 10)))
    adapted = mj.from_pretrained(directory, lora=LORA)
    _randomise_b(adapted)
    if nf4:
        quantize_base(adapted)
    expected = np.asarray(adapted(ids).logits)
    plain = merge_adapters(adapted)
    assert not [v for _, v in nnx.iter_graph(plain) if isinstance(v, LoRAParam)] and plain.lora is None
    np.testing.assert_allclose(np.asarray(plain(ids).logits), expected, atol=1e-5, rtol=0)
