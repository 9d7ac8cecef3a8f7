"""The sparse mixture-of-experts block: one router, three interchangeable ways to compute the experts.

All backends compute `sum_j w_j * expert_{e_j}(x)` over the top-k experts `e_j` of each token, with
`expert(x) = w2(silu(w1 x) * w3 x)`; they differ only in how tokens reach their experts:

* `dense`: every expert on every token, weighted by a mostly-zero combine matrix. The reference.
* `dropless`: assignments sorted by expert, one grouped matrix product per weight, nothing dropped.
  The grouped product is JAX's Pallas megablox kernel for TPUs (`gmm_tpu`, MaxText's), JAX's Pallas kernels
  for Hopper GPUs (`gmm_gpu`; XLA's GPU ragged_dot, like its CPU one, computes every group densely),
  `jax.lax.ragged_dot` (other devices) or a blocked product of our own (CPU); tokamax's `ragged_dot`
  (`gmm_tokamax`) is on trial against `gmm_gpu`.
* `capacity`: each expert takes at most `capacity` assignments per sequence (GShard), the rest are dropped
  (their contribution is zero, the residual stream carries the token on). Dispatch and combine are gathers.

Tokens move by gathers, never scatters of rows (slow on CPU): in the dropless backend every move is a
permutation whose gradient is the gather by the inverse permutation (`permute_rows`).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mixtral_jax.config import MixtralConfig
from mixtral_jax.kernels import grouped_matmul_gpu as gmm_gpu
from mixtral_jax.kernels import grouped_matmul_tokamax as gmm_tokamax
from mixtral_jax.kernels import grouped_matmul_tpu as gmm_tpu
from mixtral_jax.kernels.select import grouped_matmul_kind
from mixtral_jax.model.expert_parallel import dropless_expert_parallel
from mixtral_jax.model.expert_rows import sort_by_expert, unsort_and_combine
from mixtral_jax.model.lora import LoraConfig, adapter_of, attach, project
from mixtral_jax.model.nf4_base import read
from mixtral_jax.parallel.sharding import active_mesh, constrain


class SparseMoE(nnx.Module):
    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        d, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
        pdtype = jnp.dtype(config.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        self.config = config
        self.gate = nnx.Param(init(rngs.params(), (d, e), pdtype), logical_axes=("embed", None))
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), pdtype), logical_axes=("experts", "embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (e, d, f), pdtype), logical_axes=("experts", "embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (e, f, d), pdtype), logical_axes=("experts", "mlp", "embed"))
        self.lora = lora
        attach(self, "gate", self.gate.shape, 1, ("embed", None), lora, rngs)
        for name in ("w1", "w2", "w3"):
            weight = getattr(self, name)
            attach(self, name, weight.shape, 1, weight.get_metadata()["logical_axes"], lora, rngs, leading=1)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None,
                 router_bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, S, D] -> (output [B, S, D], router logits [B, S, E] in fp32, number of dropped assignments).

        `router_bias` [E] (fp32) is added to the router logits before routing (and the returned logits are the
        biased ones); `-inf` switches an expert off: its softmax probability is exactly zero, so it is never
        among the top-k while at least k experts are on, and the others renormalise among themselves.
        """
        cfg = self.config
        dtype = x.dtype
        logits = project(x, read(self.gate, dtype), adapter_of(self, "gate", dtype, dropout_key), 1).astype(jnp.float32)
        if router_bias is not None:
            logits = logits + jnp.asarray(router_bias, jnp.float32)
        expert_ids, expert_weights = route(logits, cfg.num_experts_per_tok)
        expert_weights = expert_weights.astype(dtype)
        # Each expert weight travels with its adapter (or None): (W [E, in, out], Adapter | None).
        w1, w2, w3 = ((read(getattr(self, n), dtype), adapter_of(self, n, dtype, dropout_key)) for n in ("w1", "w2", "w3"))
        if cfg.moe_backend == "dense":
            out, dropped = dense_experts(x, expert_ids, expert_weights, w1, w2, w3), jnp.int32(0)
        elif cfg.moe_backend == "dropless" and active_mesh() is not None:
            # On a mesh each device sorts only its own tokens (a global sort would gather the whole batch).
            out = dropless_expert_parallel(x, expert_ids, expert_weights, w1, w2, w3, partial(_grouped_swiglu, cfg),
                                           cfg.expert_exchange, *active_mesh())
            dropped = jnp.int32(0)
        elif cfg.moe_backend == "dropless":
            out, dropped = dropless_experts(x, expert_ids, expert_weights, w1, w2, w3, cfg), jnp.int32(0)
        else:
            out, dropped = capacity_experts(x, expert_ids, expert_weights, w1, w2, w3, cfg.capacity_factor)
        return out, logits, dropped


def route(router_logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """transformers' MixtralTopKRouter: softmax in fp32, top-k, the k weights renormalised to sum to one.

    Computed as the top-k of the logits and a softmax over those k alone, which is the same thing (the softmax
    is monotone, and p_i / sum_topk p_j = exp(x_i) / sum_topk exp(x_j)) but depends, to the last bit, only on
    the k chosen logits: switching off (router bias -inf) an expert that was not chosen changes nothing.
    """
    top_logits, top_ids = jax.lax.top_k(router_logits.astype(jnp.float32), top_k)
    return top_ids, jax.nn.softmax(top_logits, axis=-1)


def expert_assignments(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """[L, E]: how many (real, where `mask` [B, T] is true) tokens each layer's router sent to each expert,
    from router logits [L, B, T, E] (the training metrics and `eval experts` count this)."""
    top_ids, _ = route(router_logits, top_k)
    one_hot = jax.nn.one_hot(top_ids, router_logits.shape[-1], dtype=jnp.float32)     # [L, B, T, k, E]
    weight = jnp.ones(router_logits.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.einsum("lbtke,bt->le", one_hot, weight)


# The name of the experts' products, which the remat policy "dots_and_experts" saves (transformer.py): a
# Pallas grouped product is no dot, so under "dots_no_batch" the backward computes the experts' forward again.
EXPERT_PRODUCTS = "expert_products"


def _swiglu(x, w1, w3, w2, matmul):
    """w2(silu(w1 x) * w3 x), each weight an array or a (W, Adapter | None) pair; `matmul(lhs, W)` is the
    backend's (grouped) product, which the adapters reuse: x W + scale * (x A) B.

    Each projection's output (with its adapter's share) and each x A is named EXPERT_PRODUCTS: what the
    backward reads, one [rows, out] per weight (x W alone is read by nothing, so an adapter saves no second)."""
    def apply(lhs, weight):
        w, adapter = weight if isinstance(weight, tuple) else (weight, None)
        out = matmul(lhs, w)
        if adapter is not None:
            low_rank = checkpoint_name(matmul(adapter.input(lhs), adapter.a), EXPERT_PRODUCTS)
            out = out + adapter.scale * matmul(low_rank, adapter.b)
        return checkpoint_name(out, EXPERT_PRODUCTS)

    return apply(jax.nn.silu(apply(x, w1)) * apply(x, w3), w2)


def _weight(weight):
    return weight[0] if isinstance(weight, tuple) else weight


# ------------------------------------------------------------------------------------------------ dense
def dense_experts(x, expert_ids, expert_weights, w1, w2, w3):
    b, s, d = x.shape
    num_experts = _weight(w1).shape[0]
    combine = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=x.dtype) * expert_weights[..., None], axis=-2)
    every_expert = jnp.broadcast_to(x[:, :, None, :], (b, s, num_experts, d))
    out = _swiglu(every_expert, w1, w3, w2, lambda lhs, w: jnp.einsum("bsei,eio->bseo", lhs, w))
    return jnp.einsum("bsed,bse->bsd", out, combine)


# ------------------------------------------------------------------------------------------------ dropless
def dropless_experts(x, expert_ids, expert_weights, w1, w2, w3, config: MixtralConfig):
    num_experts = _weight(w1).shape[0]
    sorted_x, order, inverse = sort_by_expert(x, expert_ids)
    group_sizes = jnp.bincount(expert_ids.reshape(-1), length=num_experts).astype(jnp.int32)
    sorted_out = _grouped_swiglu(config, sorted_x, group_sizes, w1, w2, w3)
    return unsort_and_combine(sorted_out, order, inverse, expert_weights)


def _grouped_swiglu(config: MixtralConfig, rows, group_sizes, w1, w2, w3):
    """The experts on rows grouped by expert, with the configured grouped product (what each expert shard
    computes in expert_parallel.py too)."""
    return _swiglu(rows, w1, w3, w2, grouped_product(config, group_sizes))


def grouped_product(config: MixtralConfig, group_sizes: jax.Array):
    """The configured grouped product `matmul(rows, weights)` for rows sorted into groups of `group_sizes`."""
    kind = grouped_matmul_kind(config.grouped_matmul)
    if kind == "ragged_dot":
        return lambda rows, weights: jax.lax.ragged_dot(rows, weights, group_sizes)
    if kind == "mosaic_gpu":
        return lambda rows, weights: gmm_gpu.grouped_matmul(rows, weights, group_sizes)
    if kind == "megablox":
        return lambda rows, weights: gmm_tpu.grouped_matmul(rows, weights, group_sizes)
    if kind == "tokamax":
        return lambda rows, weights: gmm_tokamax.grouped_matmul(rows, weights, group_sizes)
    return lambda rows, weights: blocked_grouped_matmul(rows, weights, group_sizes, config.moe_block_size)


def blocked_grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N] -> [M, N], row i multiplied by its group's weight.

    A loop over the non-empty groups, and inside it over the group's rows in blocks: each expert's weight is
    read once per call, and the work is the real rows plus at most one partial block per group (ragged_dot
    on CPU multiplies every row by every group). Its gradient is the same loop: dRows is the grouped product
    with the transposed weights, dWeights a per-group sum of block outer products.
    """
    return _blocked_gmm(rows, weights, group_sizes, _effective_block(rows.shape[0], block))


def _effective_block(rows: int, block: int) -> int:
    """Few rows (decoding) get small blocks, so a one-token step does not compute a whole block per expert."""
    return max(1, min(block, 1 << (max(rows, 1) - 1).bit_length()))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_gmm(rows, weights, group_sizes, block):
    return _grouped_product(rows, weights, group_sizes, block, transpose_weights=False)


def _blocked_gmm_forward(rows, weights, group_sizes, block):
    return _blocked_gmm(rows, weights, group_sizes, block), (rows, weights, group_sizes)


def _blocked_gmm_backward(block, residuals, grad):
    rows, weights, group_sizes = residuals
    return (_grouped_product(grad, weights, group_sizes, block, transpose_weights=True),
            _grouped_weight_gradient(rows, grad, group_sizes, block), None)


_blocked_gmm.defvjp(_blocked_gmm_forward, _blocked_gmm_backward)


def _grouped_product(rows, weights, group_sizes, block, transpose_weights):
    m = rows.shape[0]
    n = weights.shape[1] if transpose_weights else weights.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_weights else (((1,), (0,)), ((), ()))
    padded = jnp.pad(rows, ((0, block), (0, 0)))  # a group's last block may read past the end
    starts = jnp.cumsum(group_sizes) - group_sizes

    def group(g, out):
        weight = weights[g]

        def one_block(b, out):
            # A partial last block also overwrites the first rows of later groups; those are written again,
            # correctly, when their own group runs (groups run in order).
            row = starts[g] + b * block
            product = jax.lax.dot_general(jax.lax.dynamic_slice_in_dim(padded, row, block), weight, contract)
            return jax.lax.dynamic_update_slice_in_dim(out, product.astype(out.dtype), row, 0)

        return jax.lax.fori_loop(0, -(-group_sizes[g] // block), one_block, out)

    def maybe_group(g, out):
        return jax.lax.cond(group_sizes[g] > 0, group, lambda g, out: out, g, out)

    out = jax.lax.fori_loop(0, weights.shape[0], maybe_group, jnp.zeros((m + block, n), rows.dtype))
    return out[:m]


def _grouped_weight_gradient(rows, grad, group_sizes, block):
    """[G, K, N]: for each group, the sum over its rows of outer(rows, grad), accumulated in fp32."""
    k, n = rows.shape[1], grad.shape[1]
    rows_padded = jnp.pad(rows, ((0, block), (0, 0)))
    grad_padded = jnp.pad(grad, ((0, block), (0, 0)))
    starts = jnp.cumsum(group_sizes) - group_sizes

    def group(g, result):
        def one_block(b, acc):
            row = starts[g] + b * block
            valid = b * block + jnp.arange(block) < group_sizes[g]
            lhs = jnp.where(valid[:, None], jax.lax.dynamic_slice_in_dim(rows_padded, row, block), 0)
            rhs = jax.lax.dynamic_slice_in_dim(grad_padded, row, block)
            return acc + jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, -(-group_sizes[g] // block), one_block, jnp.zeros((k, n), jnp.float32))
        return result.at[g].set(acc.astype(result.dtype))

    return jax.lax.fori_loop(0, group_sizes.shape[0], group,
                             jnp.zeros((group_sizes.shape[0], k, n), rows.dtype))


# ------------------------------------------------------------------------------------------------ capacity
def expert_capacity(seq_len: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert per sequence; never more than the sequence length (an expert gets a token once)."""
    return max(1, min(seq_len, math.ceil(capacity_factor * seq_len * top_k / num_experts)))


def capacity_experts(x, expert_ids, expert_weights, w1, w2, w3, capacity_factor):
    """Per sequence: each expert takes its first `capacity` assignments in token order; the rest are dropped."""
    b, s, d = x.shape
    k, num_experts = expert_ids.shape[-1], _weight(w1).shape[0]
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
    # With experts sharded, these two constraints make GSPMD move the slots to their experts' devices and
    # back (all-to-all over the expert axis).
    dispatched = constrain(dispatched, ("exp_batch", "act_experts", None, "act_embed"))
    matmul = lambda lhs, w: jnp.einsum("beci,eio->beco", lhs, w)
    expert_out = constrain(_swiglu(dispatched, w1, w3, w2, matmul), ("exp_batch", "act_experts", None, "act_embed"))
    expert_out = constrain(expert_out.reshape(b, num_experts * capacity, d), ("batch", None, "act_embed"))
    per_assignment = jnp.take_along_axis(expert_out, assignment_slot[..., None], axis=1)
    per_assignment = jnp.where(kept[..., None], per_assignment, 0).reshape(b, s, k, d)
    dropped = jnp.sum(~kept).astype(jnp.int32)
    return jnp.einsum("bskd,bsk->bsd", per_assignment, expert_weights), dropped
