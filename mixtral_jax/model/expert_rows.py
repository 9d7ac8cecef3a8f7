"""The dropless backends' moves of rows: each token's k assignments grouped by expert, and back.

Shared by the single-device path (moe.py) and the expert-parallel one (expert_parallel.py). Rows move by
gathers, never scatters of rows (slow on CPU): every move is a permutation whose gradient is the gather by the
inverse permutation (`permute_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def permute_rows(x: jax.Array, permutation: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[permutation], whose transpose is the gather by the inverse permutation (not a scatter-add)."""
    return x[permutation]


def _permute_rows_forward(x, permutation, inverse):
    return x[permutation], (permutation, inverse)


def _permute_rows_backward(residuals, grad):
    _, inverse = residuals
    return grad[inverse], None, None


permute_rows.defvjp(_permute_rows_forward, _permute_rows_backward)


def sort_by_expert(x, expert_ids):
    """x's rows once per assignment (a = token * k + j), grouped by expert with token order inside, and the
    permutation both ways (the grouped product needs each expert's rows contiguous)."""
    k, d = expert_ids.shape[-1], x.shape[-1]
    order = jnp.argsort(expert_ids.reshape(-1), stable=True)
    inverse = jnp.argsort(order)
    return permute_rows(jnp.repeat(x.reshape(-1, d), k, axis=0), order, inverse), order, inverse


def unsort_and_combine(sorted_out, order, inverse, expert_weights):
    """Back to assignment order, then each token's k expert outputs summed with the router's weights."""
    b, s, k = expert_weights.shape
    per_assignment = permute_rows(sorted_out, inverse, order).reshape(b, s, k, sorted_out.shape[-1])
    return jnp.einsum("bskd,bsk->bsd", per_assignment, expert_weights)
