"""QLoRA's base: NF4 weights inside the model, dequantised where read, sharded like the weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.model import nf4_base
from mixtral_jax.model.lora import LoraConfig, LoRAParam
from mixtral_jax.model.nf4_base import base_nbytes, quantize_base, quantize_model
from mixtral_jax.parallel import sharding
from mixtral_jax.parallel.collectives import collective_bytes, compile_partitioned
from mixtral_jax.quantization.nf4_weight import (
    NF4Weight,
    dequantize_weight,
    quantize_weight,
)
from train.optim import OptimizerConfig, make_optimizer
from train.plan import nf4_base_bytes
from train.step import make_train_step

CONFIG = mj.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)


@pytest.mark.slow
def test_a_weight_quantises_per_slice_exactly_as_bitsandbytes():
    """Plain NF4 (double quantisation per tensor: tests/quantization/test_nf4_weight.py)."""
    import bitsandbytes.functional as bnbf

    weight = jax.random.normal(jax.random.key(0), (2, 8, 64, 128))  # [L, E, D, F]
    q = quantize_weight(weight, ("layers", "experts", "embed", "mlp"), leading=1, double_quant=False)
    assert q.packed.shape == (2, 8, 64, 64) and q.absmax.shape == (2, 8, 64, 2)
    for layer in range(2):
        ref_packed, state = bnbf.quantize_4bit(torch.from_numpy(np.array(weight[layer])), blocksize=64,
                                               quant_type="nf4")
        assert np.asarray(q.packed[layer]).tobytes() == ref_packed.numpy().tobytes()
        np.testing.assert_array_equal(np.asarray(q.absmax[layer]).reshape(-1), state.absmax.numpy())
        ref = bnbf.dequantize_4bit(ref_packed, state).numpy()
        np.testing.assert_array_equal(np.asarray(dequantize_weight(q)[layer]), ref)


def _quantised_pair(lora=None):
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=lora)
    quantised = quantize_base(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=lora))
    # The reference: the same model whose weights are the dequantised NF4 values, stored in fp32.
    for (path, ref_var), (_, q_var) in zip(nnx.iter_graph(model), nnx.iter_graph(quantised)):
        if isinstance(ref_var, nnx.Variable) and isinstance(q_var.get_value(), NF4Weight):
            ref_var.set_value(dequantize_weight(q_var.get_value()))
    return model, quantised


@pytest.mark.slow
def test_quantised_model_computes_with_the_dequantised_weights():
    reference, quantised = _quantised_pair()
    ids = np.random.default_rng(0).integers(0, 96, (2, 10))
    np.testing.assert_array_equal(np.asarray(quantised(ids).logits), np.asarray(reference(ids).logits))
    stored = sum(v.get_value().nbytes for _, v in nnx.iter_graph(quantised.layers)
                 if isinstance(v, nnx.Variable) and isinstance(v.get_value(), NF4Weight))
    count = sum(int(np.prod(v.get_value().leading)) * int(np.prod(v.get_value().shape))
                for _, v in nnx.iter_graph(quantised.layers)
                if isinstance(v, nnx.Variable) and isinstance(v.get_value(), NF4Weight))
    # double-quantised: 4 bits, an 8-bit code per 64, per tensor an fp32 scale per 256 blocks and an offset
    assert stored == nf4_base_bytes(CONFIG) and 8 * stored / count == pytest.approx(4.133, abs=1e-3)
    total, params = base_nbytes(quantised)
    assert total < 0.6 * 4 * params  # embeddings, LM head and norms stay fp32 here


@pytest.mark.slow
def test_qlora_loss_falls_and_only_adapters_change():
    lora = LoraConfig(rank=8, alpha=16.0)
    model = quantize_base(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=lora))
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    step = make_train_step(model, make_optimizer(OptimizerConfig(learning_rate=1e-2), total_steps=30), mesh,
                           (8, 12), trainable=LoRAParam)
    params, frozen = step.split(model)
    opt_state = step.init_opt_state(params)
    ids = np.random.default_rng(1).integers(0, 96, (8, 12)).astype(np.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
    losses = []
    for _ in range(30):
        params, opt_state, metrics = step.step(params, opt_state, batch, frozen, None)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5]), losses


@pytest.mark.slow
def test_nf4_weights_shard_like_the_weights_they_replace():
    model = quantize_base(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh("fsdp=2,expert=4", config=CONFIG)
    sharding.shard_model(model, mesh)
    w1 = model.layers.block_sparse_moe.w1.get_value()
    assert {s.data.shape for s in w1.packed.addressable_shards} == {(2, 2, 32, 64)}  # [L, E/4, D/2, F/2]
    assert {s.data.shape for s in w1.absmax_q.addressable_shards} == {(2, 2, 32, 2)}  # codes: as the scales
    assert w1.absmax_scale.sharding.is_fully_replicated and w1.offset.sharding.is_fully_replicated
    assert w1.offset.shape == (2, 8, 1) and w1.absmax_scale.shape == (2, 8, 1)  # per expert: its own tensor
    reference = quantize_base(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0)))
    ids = np.random.default_rng(2).integers(0, 96, (8, 6))

    @nnx.jit
    def logits(model, ids):
        with sharding.use_mesh(mesh):
            return model(ids).logits

    np.testing.assert_allclose(np.asarray(logits(model, ids)), np.asarray(reference(ids).logits), atol=1e-5)


@pytest.mark.slow
def test_fsdp_gathers_the_4_bit_codes_not_the_dequantised_weights(monkeypatch):
    """The forward's all-gathers on an fsdp mesh, with the codes gathered before dequantising and (the code's
    former behaviour, `_gathered` undone) without: the fp32 weights are 7x the bytes of their codes and scales."""
    model = quantize_base(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh("fsdp=8", config=CONFIG)
    sharding.shard_model(model, mesh)
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((8, 16), np.int32, sharding=sharding.named_sharding(("batch", None), (8, 16), mesh))

    def all_gathered() -> int:
        def logits(state, ids):
            with sharding.use_mesh(mesh):
                return nnx.merge(graphdef, state)(ids).logits

        return collective_bytes(compile_partitioned(jax.jit(logits).lower(state, ids))[1])["all-gather"]

    codes = all_gathered()
    monkeypatch.setattr(nf4_base, "_gathered", lambda q: q)
    dequantised = all_gathered()
    base, _ = base_nbytes(model)
    assert codes < base < 2 * codes and dequantised > 5 * codes


def _abstract_base(config, quantize: str):
    return nnx.eval_shape(lambda: quantize_model(mj.Mixtral(config, rngs=nnx.Rngs(0)), quantize))


def _nf4_bytes_and_count(model) -> tuple[int, int]:
    weights = [v.get_value() for _, v in nnx.iter_graph(model.layers)
               if isinstance(v, nnx.Variable) and isinstance(v.get_value(), NF4Weight)]
    return sum(w.nbytes for w in weights), sum(int(np.prod(w.leading)) * int(np.prod(w.shape)) for w in weights)


@pytest.mark.slow
def test_mixtral_8x7b_base_stores_4_127_bits_per_parameter():
    """The abstract 8x7B base (shapes only): double-quantised by default, ~4.127 bits per quantised parameter
    (bitsandbytes' double quantisation), ~2 GB less than plain NF4's 4.5; the plan's hand count agrees."""
    config = mj.MixtralConfig.from_preset("mixtral-8x7b")
    double, count = _nf4_bytes_and_count(_abstract_base(config, "nf4"))
    plain, plain_count = _nf4_bytes_and_count(_abstract_base(config, "nf4-plain"))
    assert count == plain_count and 46.3e9 < count < 46.5e9
    assert 8 * plain / count == 4.5 and abs(8 * double / count - 4.127) < 1e-3
    assert double == nf4_base_bytes(config) and plain == nf4_base_bytes(config, double_quant=False)
    assert 2.0e9 < plain - double < 2.2e9
    total, params = base_nbytes(_abstract_base(config, "nf4"))
    assert total == double + 2 * (params - count)  # the rest (embeddings, LM head, norms) in bf16


def test_quantize_settings():
    plain = quantize_model(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0)), "nf4-plain")
    assert not plain.layers.self_attn.q_proj.get_value().double_quant
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0))
    assert quantize_model(model, "none") is model and not isinstance(model.layers.block_sparse_moe.w1.get_value(),
                                                                      NF4Weight)
    assert quantize_base(plain).layers.self_attn.q_proj.get_value().absmax is not None  # NF4 already: kept
    with pytest.raises(ValueError, match="quantize must be"):
        quantize_model(model, "nf8")
