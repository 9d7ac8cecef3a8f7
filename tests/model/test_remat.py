"""The remat policy "dots_and_experts" saves the experts' products (named in moe.py): its backward computes no
grouped product that "none" does not, where "dots_no_batch" computes the experts' forward again."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import ClosedJaxpr, Jaxpr

import mixtral_jax as mj
from mixtral_jax.config import MixtralConfig


def _count(jaxpr: Jaxpr, primitive: str) -> int:
    """How many `primitive` equations `jaxpr` holds, inside scans, remats and custom rules included."""
    found = 0
    for eqn in jaxpr.eqns:
        found += eqn.primitive.name == primitive
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    found += _count(getattr(sub, "jaxpr", sub), primitive)
    return found


def _loss(policy: str):
    """(loss of the parameters, parameters) of a tiny dropless model whose experts' grouped product is
    jax.lax.ragged_dot: a primitive no dot policy saves, as a Pallas call."""
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           grouped_matmul="ragged_dot", remat_policy=policy)
    graphdef, state = nnx.split(mj.Mixtral(config, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, config.vocab_size)
    return lambda state: jnp.mean(nnx.merge(graphdef, state)(ids).logits ** 2), state


def _grouped_products(policy: str) -> int:
    """The ragged dots in the forward and backward program."""
    loss, state = _loss(policy)
    return _count(jax.make_jaxpr(jax.value_and_grad(loss))(state).jaxpr, "ragged_dot_general")


@pytest.mark.slow
def test_dots_and_experts_computes_what_none_does():
    (value, grads), (base_value, base_grads) = (jax.jit(jax.value_and_grad(loss))(state)
                                                for loss, state in map(_loss, ("dots_and_experts", "none")))
    np.testing.assert_allclose(float(value), float(base_value), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7, rtol=1e-5)


def test_dots_and_experts_saves_the_expert_products():
    """Per layer: 3 products forward, 2 per product backward; dots_no_batch runs the 3 forward ones again."""
    assert _grouped_products("dots_and_experts") == _grouped_products("none") < _grouped_products("dots_no_batch")
