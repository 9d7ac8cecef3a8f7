"""What the grouped-product kernels' tests share (gmm_gpu, megablox, tokamax): a problem of rows sorted into
groups (one empty, the last rows past every group, as expert parallelism pads), the product's value and
gradients under a cotangent, the transposed reference, and the MoE block on a kernel against the blocked one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.moe import dropless_experts, route


def problem(dtype, rows=40, k=128, n=192, sizes=(9, 0, 17, 6)):
    """(rows [rows, k], weights [G, k, n], group sizes, cotangent [rows, n])."""
    r1, r2, r3 = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(r1, (rows, k), dtype), jax.random.normal(r2, (len(sizes), k, n), dtype),
            jnp.asarray(sizes, jnp.int32), jax.random.normal(r3, (rows, n), dtype))


def value_and_grads(matmul, rows, weights, sizes, cotangent, keep_dtypes: bool = False):
    """[product, d rows, d weights] in fp32 numpy; `keep_dtypes` also asserts each came in its input's dtype."""
    def loss(r, w):
        out = matmul(r, w, sizes)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(rows, weights)
    if keep_dtypes:
        assert out.dtype == rows.dtype and grads[0].dtype == rows.dtype and grads[1].dtype == weights.dtype
    return [np.asarray(a, np.float32) for a in (out, *grads)]


def reference_transposed(lhs, rhs, group_sizes):
    """The weight gradient's product: lhs [M, K] and rhs [M, N] contracted over their rows per group."""
    numbers = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, numbers, preferred_element_type=jnp.float32)


def moe_block_against_blocked(grouped_matmul: str, intermediate: int):
    """(the bf16 MoE block with `grouped_matmul`, the same with the blocked product) on one random problem."""
    config = MixtralConfig(vocab_size=64, hidden_size=128, intermediate_size=intermediate, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           dtype="bfloat16", grouped_matmul=grouped_matmul)
    keys = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(keys[0], (2, 8, 128), jnp.bfloat16)
    w1, w3 = (0.1 * jax.random.normal(key, (4, 128, intermediate), jnp.bfloat16) for key in keys[1:3])
    w2 = 0.1 * jax.random.normal(keys[3], (4, intermediate, 128), jnp.bfloat16)
    ids, weights = route(jax.random.normal(keys[4], (2, 8, 4)), 2)
    weights = weights.astype(jnp.bfloat16)
    return (dropless_experts(x, ids, weights, w1, w2, w3, config),
            dropless_experts(x, ids, weights, w1, w2, w3, config.replace(grouped_matmul="blocked")))
