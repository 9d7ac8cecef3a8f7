"""The sparse mixture-of-experts block: one router, three interchangeable ways to compute the experts.

All backends compute `sum_j w_j * expert_{e_j}(x)` over the top-k experts `e_j` of each token, with
`expert(x) = w2(silu(w1 x) * w3 x)`; they differ only in how tokens reach their experts:

* `dense`: every expert on every token, weighted by a mostly-zero combine matrix. The reference.
* `dropless`: assignments sorted by expert, one grouped matrix product per weight, nothing dropped.
  The grouped product is `jax.lax.ragged_dot` (for GPU/TPU) or a blocked product of our own (for CPU, where
  ragged_dot computes every group densely).
* `capacity`: each expert takes at most `capacity` assignments per sequence (GShard), the rest are dropped
  (their contribution is zero, the residual stream carries the token on). Dispatch and combine are gathers.

Every data movement is a gather: scatters of rows are slow on CPU, and each gather here has a gather as its
transpose, because the token permutations are bijections.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MixtralConfig


class SparseMoE(nnx.Module):
    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs):
        d, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
        pdtype = jnp.dtype(config.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        self.config = config
        self.gate = nnx.Param(init(rngs.params(), (d, e), pdtype), logical_axes=("embed", None))
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), pdtype), logical_axes=("experts", "embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, f), pdtype), logical_axes=("experts", "embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (e, f, d), pdtype), logical_axes=("experts", "mlp", "embed"))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, S, D] -> (output [B, S, D], router logits [B, S, E] in fp32, number of dropped assignments)."""
        cfg = self.config
        dtype = x.dtype
        logits = jnp.einsum("bsd,de->bse", x, self.gate[...].astype(dtype), preferred_element_type=jnp.float32)
        expert_ids, expert_weights = route(logits, cfg.num_experts_per_tok)
        expert_weights = expert_weights.astype(dtype)
        w1, w2, w3 = (w[...].astype(dtype) for w in (self.w1, self.w2, self.w3))
        if cfg.moe_backend == "dense":
            out, dropped = dense_experts(x, expert_ids, expert_weights, w1, w2, w3), jnp.int32(0)
        elif cfg.moe_backend == "dropless":
            out, dropped = dropless_experts(x, expert_ids, expert_weights, w1, w2, w3, cfg), jnp.int32(0)
        else:
            out, dropped = capacity_experts(x, expert_ids, expert_weights, w1, w2, w3, cfg.capacity_factor)
        return out, logits, dropped


def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Softmax in fp32, top-k, the k weights renormalised to sum to one (transformers' MixtralTopKRouter)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_probs, top_ids = jax.lax.top_k(probs, top_k)
    return top_ids, top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)


def _swiglu(x, w1, w3, w2, matmul):
    return matmul(jax.nn.silu(matmul(x, w1)) * matmul(x, w3), w2)


# ------------------------------------------------------------------------------------------------ dense
def dense_experts(x, expert_ids, expert_weights, w1, w2, w3):
    num_experts = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=x.dtype) * expert_weights[..., None], axis=-2)
    hidden = jax.nn.silu(jnp.einsum("bsd,edf->bsef", x, w1)) * jnp.einsum("bsd,edf->bsef", x, w3)
    return jnp.einsum("bsef,efd,bse->bsd", hidden, w2, combine)


# ------------------------------------------------------------------------------------------------ dropless
def dropless_experts(x, expert_ids, expert_weights, w1, w2, w3, config: MixtralConfig):
    b, s, d = x.shape
    k, num_experts = expert_ids.shape[-1], w1.shape[0]
    flat_ids = expert_ids.reshape(-1)                        # assignment a = token * k + j
    order = jnp.argsort(flat_ids, stable=True)               # assignments grouped by expert, token order inside
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
    sorted_x = x.reshape(-1, d)[order // k]
    if config.grouped_matmul == "ragged_dot":
        matmul = lambda lhs, w: jax.lax.ragged_dot(lhs, w, group_sizes)
    else:
        matmul = lambda lhs, w: blocked_grouped_matmul(lhs, w, group_sizes, config.moe_block_size)
    sorted_out = _swiglu(sorted_x, w1, w3, w2, matmul)
    inverse = jnp.argsort(order)
    per_assignment = sorted_out[inverse].reshape(b, s, k, d)
    return jnp.einsum("bskd,bsk->bsd", per_assignment, expert_weights)


def blocked_grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N] -> [M, N], row i multiplied by its group's weight.

    Each group is padded to whole blocks of `block` rows, so every block belongs to one group; a scan over the
    blocks multiplies each by its group's weight and skips the unused tail. Work is the real rows plus at most
    one partial block per group, against ragged_dot's every-row-by-every-group on CPU.
    """
    m, _ = rows.shape
    num_groups, _, n = weights.shape
    num_blocks = -(-m // block) + num_groups  # each group adds at most one partial block
    padded_sizes = -(-group_sizes // block) * block
    padded_end = jnp.cumsum(padded_sizes)
    padded_start = padded_end - padded_sizes
    start = jnp.cumsum(group_sizes) - group_sizes

    block_group = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
    block_used = block_group < num_groups
    block_group = jnp.minimum(block_group, num_groups - 1)

    slot = jnp.arange(num_blocks * block)
    slot_group = block_group[slot // block]
    slot_rank = slot - padded_start[slot_group]
    slot_valid = block_used[slot // block] & (slot_rank < group_sizes[slot_group])
    source_row = jnp.clip(start[slot_group] + slot_rank, 0, m - 1)
    padded = jnp.where(slot_valid[:, None], rows[source_row], 0).reshape(num_blocks, block, -1)

    def one_block(_, inputs):
        x_block, group, used = inputs
        out = jax.lax.cond(used, lambda: x_block @ weights[group], lambda: jnp.zeros((block, n), rows.dtype))
        return None, out

    _, out_blocks = jax.lax.scan(one_block, None, (padded, block_group, block_used))
    row = jnp.arange(m)
    row_group = jnp.searchsorted(start + group_sizes, row, side="right")
    row_group = jnp.minimum(row_group, num_groups - 1)
    return out_blocks.reshape(-1, n)[padded_start[row_group] + row - start[row_group]]


# ------------------------------------------------------------------------------------------------ capacity
def expert_capacity(seq_len: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert per sequence; never more than the sequence length (an expert gets a token once)."""
    return max(1, min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts)))


def capacity_experts(x, expert_ids, expert_weights, w1, w2, w3, capacity_factor):
    """Per sequence: each expert takes its first `capacity` assignments in token order; the rest are dropped."""
    b, s, d = x.shape
    k, num_experts = expert_ids.shape[-1], w1.shape[0]
    capacity = expert_capacity(s, k, num_experts, capacity_factor)

    def dispatch(ids):  # one sequence: ids [S, k] -> (token per slot [E, C], slot valid, slot of each assignment)
        flat_ids = ids.reshape(-1)
        order = jnp.argsort(flat_ids, stable=True)
        group_sizes = jnp.bincount(flat_ids, length=num_experts)
        start = jnp.cumsum(group_sizes) - group_sizes
        slot_rank = jnp.arange(capacity)
        slot_valid = slot_rank[None, :] < group_sizes[:, None]
        slot_source = jnp.clip(start[:, None] + slot_rank[None, :], 0, s * k - 1)
        slot_token = order[slot_source] // k
        rank = jnp.argsort(order) - start[flat_ids]
        kept = rank < capacity
        assignment_slot = flat_ids * capacity + jnp.minimum(rank, capacity - 1)
        return slot_token, slot_valid, assignment_slot, kept

    slot_token, slot_valid, assignment_slot, kept = jax.vmap(dispatch)(expert_ids)
    dispatched = jnp.take_along_axis(x, slot_token.reshape(b, -1, 1), axis=1).reshape(b, num_experts, capacity, d)
    dispatched = jnp.where(slot_valid[..., None], dispatched, 0)
    matmul = lambda lhs, w: jnp.einsum("becd,edf->becf", lhs, w)
    expert_out = _swiglu(dispatched, w1, w3, w2, matmul).reshape(b, num_experts * capacity, d)
    per_assignment = jnp.take_along_axis(expert_out, assignment_slot[..., None], axis=1)
    per_assignment = jnp.where(kept[..., None], per_assignment, 0).reshape(b, s, k, d)
    dropped = jnp.sum(~kept).astype(jnp.int32)
    return jnp.einsum("bskd,bsk->bsd", per_assignment, expert_weights), dropped
