"""The train step: gradient accumulation, trainable-only updates (LoRA), the loss falling, the schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.model.lora import LoraConfig, LoRAParam
from mixtral_jax.model.loss import next_token_nll
from mixtral_jax.parallel import sharding
from train.optim import OptimizerConfig, make_optimizer, schedule
from train.step import make_train_step

CONFIG = mj.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
ONE_DEVICE = None


def _mesh():
    return sharding.make_mesh("data=1", devices=jax.devices()[:1])


def _batch(rows=8, length=12, seed=0):
    ids = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (rows, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[2, :4] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[5, :7] = -100  # prompt tokens, as in SFT: rows carry different numbers of labels
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.slow
def test_four_micro_batches_equal_one_batch_of_four_times_the_rows():
    """Token-weighted: the NLL is averaged over every label of the global batch, whatever the split.
    (The router's aux loss is a product of batch means, so it is averaged per micro-batch, as transformers'
    Trainer does under accumulation; coef 0 here isolates the exact part.)"""
    batch = _batch()
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0))
    results = []
    for micro in (1, 4):
        step = make_train_step(model, optax.sgd(0.1), _mesh(), (8, 12), micro_batches=micro, aux_loss_coef=0.0)
        params, frozen = step.split(model)
        results.append(jax.device_get(step.grads(params, batch, frozen, None)))
    (g1, m1), (g4, m4) = results
    assert abs(float(m1["lm_loss"]) - float(m4["lm_loss"])) < 1e-6
    assert int(m1["tokens"]) == int(m4["tokens"]) == int(np.sum(batch["labels"][:, 1:] != -100))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_gradients_equal_autodiff_of_the_whole_logits(lora):
    """The step's loss is computed a chunk of logits at a time (loss.fused_next_token_nll); its gradients are
    those of the plain loss over the model's whole logits, for a trained head and a frozen one (LoRA)."""
    batch = _batch()
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=LoraConfig(rank=4, alpha=8.0) if lora else None)
    trainable = LoRAParam if lora else nnx.Param
    step = make_train_step(model, optax.sgd(0.1), _mesh(), (8, 12), trainable=trainable)
    params, frozen = step.split(model)
    if lora:  # B = 0 would leave A without a gradient
        params = jax.tree.map(lambda a: a + 0.05, params)
    grads, metrics = step.grads(params, batch, frozen, None)
    graphdef = nnx.split(model, trainable, ...)[0]

    def plain_loss(params):
        out = nnx.merge(graphdef, params, frozen)(batch["input_ids"], batch["attention_mask"])
        nll, tokens = next_token_nll(out.logits, batch["labels"])
        return nll / tokens + CONFIG.router_aux_loss_coef * out.aux_loss

    loss, expected = jax.value_and_grad(plain_loss)(params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    for ours, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_lora_step_trains_only_adapters_and_modules_to_save():
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=LoraConfig(rank=4, alpha=8.0))
    trainable = nnx.Any(LoRAParam, nnx.PathContains("embed_tokens"), nnx.PathContains("lm_head"))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), total_steps=10)
    step = make_train_step(model, optimizer, _mesh(), (8, 12), trainable=trainable)
    params, frozen = step.split(model)
    before = jax.device_get((params, frozen))
    optimizer_leaves = jax.tree.leaves(step.init_opt_state(params))
    # Optimizer memory follows the trainable parameters: two moments each, nothing for the frozen base.
    assert sum(x.size for x in optimizer_leaves) <= 2 * sum(x.size for x in jax.tree.leaves(params)) + 8
    params, opt_state, _ = step.step(params, step.init_opt_state(params), _batch(), frozen, None)
    params, _, _ = step.step(params, opt_state, _batch(), frozen, None)  # B moved in step 1, so A has a gradient now
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(before[0])]
    assert any("lora_a" in n for n in names) and any("embed_tokens" in n for n in names)
    assert not any(".w1'" in n or "'w1'" in n for n in names)  # the base experts are frozen inputs
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(params))]
    assert all(changed)
    for a, b in zip(jax.tree.leaves(jax.device_get(frozen)), jax.tree.leaves(before[1])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [None, LoraConfig(rank=8, alpha=16.0)], ids=["full", "lora"])
def test_loss_falls_over_30_steps_on_a_fixed_batch(lora):
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=lora)
    trainable = nnx.Param if lora is None else LoRAParam
    learning_rate = 3e-3 if lora is None else 1e-2
    optimizer = make_optimizer(OptimizerConfig(learning_rate=learning_rate), total_steps=30)
    step = make_train_step(model, optimizer, _mesh(), (8, 12), trainable=trainable, micro_batches=2)
    params, frozen = step.split(model)
    opt_state = step.init_opt_state(params)
    batch = _batch()
    losses = []
    for _ in range(30):
        params, opt_state, metrics = step.step(params, opt_state, batch, frozen, None)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert np.isfinite(losses).all()


def test_schedule_warms_up_then_decays_to_zero():
    lr = schedule(OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.05), total_steps=100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(1e-4)
    assert float(lr(50)) == pytest.approx(0.5e-4, rel=0.12) and float(lr(100)) == pytest.approx(0.0, abs=1e-12)


def test_schedule_refuses_no_steps_and_a_zero_learning_rate():
    with pytest.raises(ValueError, match="invalid settings"):
        schedule(OptimizerConfig(), total_steps=0)
    with pytest.raises(ValueError, match="invalid settings"):
        make_optimizer(OptimizerConfig(learning_rate=0.0), total_steps=10)


@pytest.mark.parametrize("state_dtype, moments_dtype", [("float32", jnp.float32), ("bfloat16", jnp.bfloat16),
                                                        ("param", jnp.bfloat16)])
def test_adamw_moments_are_kept_in_the_state_dtype_whatever_the_parameters(state_dtype, moments_dtype):
    """fp32 mu and nu by default for bf16 parameters (optax alone keeps nu in the parameters' dtype); updates
    come back in the gradients' dtype."""
    params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    optimizer = make_optimizer(OptimizerConfig(state_dtype=state_dtype), total_steps=10)
    state = optimizer.init(params)
    for _ in range(2):
        moments = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim == 2]
        assert len(moments) == 2 and all(m.dtype == moments_dtype for m in moments)
        updates, state = optimizer.update(jax.tree.map(lambda p: p * 0.5, params), state, params)
        assert updates["w"].dtype == jnp.bfloat16


@pytest.mark.slow
def test_micro_batches_must_divide_the_batch():
    with pytest.raises(ValueError, match="micro-batches"):
        make_train_step(mj.Mixtral(CONFIG, rngs=nnx.Rngs(0)), optax.sgd(0.1), _mesh(), (6, 12), micro_batches=4)


@pytest.mark.slow
def test_lora_dropout_is_seeded_and_off_without_a_key():
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.3)
    model = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0), lora=lora)
    for path, variable in nnx.iter_graph(model):  # non-zero B, or dropout on A's input could not show
        if isinstance(variable, LoRAParam) and str(path[-1]).endswith("_lora_b"):
            variable.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), variable.get_value().shape))
    step = make_train_step(model, optax.sgd(0.1), _mesh(), (8, 12), trainable=LoRAParam, micro_batches=2)
    params, frozen = step.split(model)
    batch = _batch()
    plain = float(step.grads(params, batch, frozen, None)[1]["loss"])
    assert plain == pytest.approx(float(step.evaluate(params, batch, frozen)["loss"]), abs=1e-6)
    first, again, other = (float(step.grads(params, batch, frozen, jax.random.key(seed))[1]["loss"])
                           for seed in (1, 1, 2))
    assert first == again and first != other and first != plain


def _movement(params, before) -> float:
    """Mean |after - before| over every trained weight, in fp32."""
    deltas = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).ravel()
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before))]
    return float(np.mean(np.concatenate(deltas)))


def _train_small_steps(model, master_dtype, steps=20):
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, warmup_ratio=0.0, weight_decay=0.0),
                               total_steps=1000)
    step = make_train_step(model, optimizer, _mesh(), (8, 12), master_dtype=master_dtype)
    params, frozen = step.split(model)
    before = jax.device_get(params)
    opt_state, batch = step.init_opt_state(params), _batch()  # one batch: the updates keep their sign
    for _ in range(steps):
        params, opt_state, _ = step.step(params, opt_state, batch, frozen, None)
    return jax.device_get(params), before


@pytest.mark.slow
def test_fp32_master_weights_let_bf16_weights_move_as_an_fp32_run_does():
    """AdamW steps of ~1e-5 on weights of ~0.02, whose bf16 spacing is ~1e-4: held as fp32 master weights (the
    default) they add up as in an all-fp32 run of the same start; held in bf16 each update rounds away."""
    bf16 = CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = mj.Mixtral(bf16, rngs=nnx.Rngs(0))
    reference = mj.Mixtral(CONFIG, rngs=nnx.Rngs(0))
    nnx.update(reference, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param)))

    fp32_params, fp32_before = _train_small_steps(reference, None)
    master_params, master_before = _train_small_steps(model, "float32")
    bf16_params, bf16_before = _train_small_steps(model, None)

    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(master_params))  # the masters, not the bf16 copy
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params))
    expected = _movement(fp32_params, fp32_before)
    assert expected > 1e-4  # the updates add up to about a bf16 spacing of these weights
    assert _movement(master_params, master_before) == pytest.approx(expected, rel=0.25)
    assert _movement(bf16_params, bf16_before) < 0.3 * expected


def test_master_weights_widen_only_narrower_floats():
    from train.step import in_dtypes, master_weights

    params = {"w": jnp.ones((2,), jnp.bfloat16), "b": jnp.ones((2,), jnp.float32), "i": jnp.ones((2,), jnp.int32)}
    held = master_weights(params, "float32")
    assert {k: v.dtype for k, v in held.items()} == {"w": jnp.float32, "b": jnp.float32, "i": jnp.int32}
    assert master_weights(params, None) is params
    back = in_dtypes(held, jax.tree.map(lambda x: x.dtype, params))
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in params.items()}
