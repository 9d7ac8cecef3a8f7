"""Dropless experts split over the mesh's `expert` axis: shard_map, and rows that travel to their experts.

Each device sorts its own assignments by expert, sends every expert shard the rows that belong to it, the
shard computes them (with a `tensor` axis the expert width is split too, and partial outputs summed) and the
results travel back. With an expert axis of 1 the exchange is the identity: data-parallel dropless. Two
exchanges (config `expert_exchange`; "auto" picks by device, kernels/select.py):

* `ragged`: `jax.lax.ragged_all_to_all` moves only the real rows, one slice per (shard, local expert), and
  writes them on the receiver already grouped by local expert. TPU and GPU: XLA's CPU backend has no ragged
  all-to-all, so on CPU its emulation runs instead (tests; it moves more than `padded`).
* `padded`: all-to-alls of fixed buffers as long as all of a device's assignments, [shards, M, D] each way:
  nothing is dropped whatever the routing, but `shards` times the bytes of the real rows travel.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mixtral_jax.kernels.select import expert_exchange_kind
from mixtral_jax.model.expert_rows import (
    permute_rows,
    sort_by_expert,
    unsort_and_combine,
)
from mixtral_jax.model.lora import Adapter
from mixtral_jax.parallel.sharding import logical_to_spec

AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class _ExpertShards:
    """What each device's step needs besides its arrays: fixed at trace time, so it travels by closure."""
    experts: Callable       # experts(rows, group_sizes, w1, w2, w3) on rows grouped by local expert
    count: int              # devices along the mesh's `expert` axis
    exchange: str           # "ragged" or "padded"
    width_split: bool       # the expert width is split over `tensor` too: partial outputs are summed
    adapters: tuple         # w1, w2, w3's Adapter or None: shard_map takes arrays, so scales and keys go here


def dropless_expert_parallel(x, expert_ids, expert_weights, w1, w2, w3, experts: Callable, exchange: str,
                             mesh, rules):
    """x [B, S, D], the router's top-k ids and weights [B, S, k], each expert weight a (W, Adapter | None) pair,
    `experts(rows, group_sizes, w1, w2, w3)` the experts on rows grouped by expert -> [B, S, D]."""
    weights = (w1, w2, w3)
    tokens_spec = logical_to_spec(("batch", None, None), x.shape, mesh, rules)
    weight_specs = _expert_weight_specs(weights, mesh, rules)
    shards = _ExpertShards(experts, mesh.shape[AXIS], expert_exchange_kind(exchange),
                           width_split=weight_specs[0][0][2] is not None,
                           adapters=tuple(adapter for _, adapter in weights))
    in_specs = (tokens_spec, tokens_spec, tokens_spec, *weight_specs)
    return jax.shard_map(partial(_dropless_on_one_device, shards), mesh=mesh, in_specs=in_specs,
                         out_specs=tokens_spec, check_vma=False)(
        x, expert_ids, expert_weights, *(_arrays_only(weight) for weight in weights))


def _expert_weight_specs(weights, mesh, rules):
    """shard_map in_specs of w1, w2, w3 as `_arrays_only` passes them: (W, (A, B) | None).

    Adapters split like their weights: A [E, in, r] by the weight's input dims, B [E, r, out] by its output.
    """
    (w1, _), (w2, _), _ = weights
    w13_spec = logical_to_spec(("experts", None, "mlp"), w1.shape, mesh, rules)
    w2_spec = logical_to_spec(("experts", "mlp", None), w2.shape, mesh, rules)
    experts_only = PartitionSpec(w13_spec[0], None, None)
    w13_adapter_spec = (experts_only, PartitionSpec(w13_spec[0], None, w13_spec[2]))
    w2_adapter_spec = (PartitionSpec(w2_spec[0], w2_spec[1], None), experts_only)
    bases = (w13_spec, w2_spec, w13_spec)
    adapter_specs = (w13_adapter_spec, w2_adapter_spec, w13_adapter_spec)
    return tuple((base, None if adapter is None else adapter_spec)
                 for (_, adapter), base, adapter_spec in zip(weights, bases, adapter_specs))


def _arrays_only(weight):
    """(W, Adapter | None) -> (W, (A, B) | None): shard_map takes arrays only."""
    w, adapter = weight
    return w, (None if adapter is None else (adapter.a, adapter.b))


def _with_adapter(weight, adapter: Adapter | None):
    """Inside shard_map, (W, (A, B)) -> (W, Adapter) again; each token shard draws its own dropout mask."""
    w, low_rank = weight
    if low_rank is None:
        return w, None
    key = adapter.key
    if key is not None:
        key = jax.random.fold_in(key, jax.lax.axis_index(("data", "fsdp", "expert")))
    return w, Adapter(*low_rank, adapter.scale, adapter.dropout, key)


def _dropless_on_one_device(shards: _ExpertShards, x, expert_ids, expert_weights, w1, w2, w3):
    """One device's tokens: send each assignment to its expert's shard, compute the rows that arrive for this
    device's experts, send the results back and combine them per token."""
    w1, w2, w3 = (_with_adapter(weight, adapter) for weight, adapter in zip((w1, w2, w3), shards.adapters))
    local_experts = w1[0].shape[0]
    sorted_x, order, inverse = sort_by_expert(x, expert_ids)
    counts = jnp.bincount(expert_ids.reshape(-1), length=shards.count * local_experts)
    counts = counts.reshape(shards.count, local_experts).astype(jnp.int32)          # [shards, local_experts]
    if shards.exchange == "ragged":
        rows, group_sizes, send_back = _ragged_exchange(sorted_x, counts, expert_ids.shape[-1])
    else:
        rows, group_sizes, send_back = _padded_exchange(sorted_x, counts)
    out = shards.experts(rows, group_sizes, w1, w2, w3)
    if shards.width_split:
        out = jax.lax.psum(out, "tensor")
    return unsort_and_combine(send_back(out), order, inverse, expert_weights)


# ------------------------------------------------------------------------------------------------ ragged
class RaggedPlan(NamedTuple):
    """One `ragged_all_to_all`'s offsets and sizes, [shards * local_experts] each: slice s * L + e is this
    device's part of the rows of shard s's local expert e."""
    input_offsets: jax.Array
    send_sizes: jax.Array
    output_offsets: jax.Array
    recv_sizes: jax.Array


def ragged_plans(counts: jax.Array, axis_name: str = AXIS) -> tuple[RaggedPlan, RaggedPlan, jax.Array]:
    """From this device's rows per (shard, local expert) [shards, L], sorted by global expert: the dispatch's
    plan, the return's (its transpose: each slice goes back where it came from) and this shard's group sizes.

    A receiver lays its rows out by local expert, and inside an expert by source: the senders learn where
    their slices land from an all-to-all of those offsets, as `ragged_all_to_all`'s documentation describes.
    """
    exchange = partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
    send_sizes = counts.reshape(-1)
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    received = exchange(counts)                                                       # [sources, L]
    group_sizes = received.sum(axis=0)
    landing = jnp.cumsum(group_sizes) - group_sizes + jnp.cumsum(received, axis=0) - received
    dispatch = RaggedPlan(input_offsets, send_sizes, exchange(landing).reshape(-1), received.reshape(-1))
    back = RaggedPlan(landing.reshape(-1), received.reshape(-1),
                      exchange(input_offsets.reshape(counts.shape)).reshape(-1), send_sizes)
    return dispatch, back, group_sizes


def _ragged_exchange(sorted_rows, counts, top_k: int):
    """-> (rows grouped by local expert, group sizes, the return trip).

    The receive buffer holds any routing: a token's k experts are distinct, so at most min(k, L) of its rows
    come to one shard, from each of the `shards` sources' M / k tokens.
    """
    shards, local_experts = counts.shape
    capacity = shards * (sorted_rows.shape[0] // top_k) * min(top_k, local_experts)
    dispatch, back, group_sizes = ragged_plans(counts)
    rows = _ragged_all_to_all(sorted_rows, jnp.zeros((capacity, sorted_rows.shape[1]), sorted_rows.dtype), dispatch)
    return rows, group_sizes, lambda out: _ragged_all_to_all(out, jnp.zeros_like(sorted_rows), back)


def _ragged_all_to_all(operand, output, plan: RaggedPlan):
    """The op, or on CPU its emulation: picked when lowering, so a program lowered here for TPU holds the op."""
    return jax.lax.platform_dependent(operand, output, *plan,
                                      cpu=partial(emulated_ragged_all_to_all, axis_name=AXIS),
                                      default=partial(jax.lax.ragged_all_to_all, axis_name=AXIS))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all` as its documentation defines it, from an all-to-all of padded buffers
    (every slice travels in a block as long as the operand): for XLA's CPU backend, which lacks the op.
    Differentiable as the gathers it is made of."""
    exchange = partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0, tiled=True)
    n = operand.shape[0]
    slot = jnp.arange(n)
    blocks = operand[jnp.clip(input_offsets[:, None] + slot, 0, n - 1)]                    # [K, N, ...]
    received = exchange(jnp.where(_broadcast(slot < send_sizes[:, None], blocks), blocks, 0))
    row = jnp.arange(output.shape[0])
    within = row - exchange(output_offsets)[:, None]                                # [K, R]: row in slice
    writes = (within >= 0) & (within < recv_sizes[:, None])
    last = writes.shape[0] - 1 - jnp.argmax(writes[::-1], axis=0)    # slices are written in order: last wins
    values = received[last, jnp.clip(within[last, row], 0, n - 1)].astype(output.dtype)
    return jnp.where(_broadcast(writes.any(axis=0), output), values, output)


def _broadcast(mask, like):
    """A mask over `like`'s leading dims, broadcastable against it."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


# ------------------------------------------------------------------------------------------------ padded
def _padded_exchange(sorted_rows, counts):
    """-> (rows grouped by local expert, padding last; group sizes; the return trip)."""
    received, received_counts = _send_to_expert_shards(sorted_rows, counts)
    rows, regroup, ungroup = _group_by_local_expert(received, received_counts)
    return (rows, received_counts.sum(axis=0),
            lambda out: _return_to_senders(permute_rows(out, ungroup, regroup), counts))


def _shard_slices(counts):
    """(rows, first row) of each expert shard's contiguous slice of the expert-sorted assignments."""
    shard_counts = counts.sum(axis=1)
    return shard_counts, jnp.cumsum(shard_counts) - shard_counts


def _send_to_expert_shards(sorted_rows, counts):
    """All-to-all over `expert`: each shard gets the rows for its experts, in a buffer as long as all of this
    device's assignments, so nothing is dropped whatever the routing.
    -> (rows [sources, M, D], padding last; per-source counts [sources, local_experts])."""
    m = sorted_rows.shape[0]
    shard_counts, shard_start = _shard_slices(counts)
    slot = jnp.arange(m)
    send_valid = slot[None, :] < shard_counts[:, None]                                # [shards, M]
    send_rows = jnp.clip(shard_start[:, None] + slot[None, :], 0, m - 1)
    send = jnp.where(send_valid[..., None], sorted_rows[send_rows], 0)                 # [shards, M, D]
    received = jax.lax.all_to_all(send, AXIS, 0, 0, tiled=True)
    received_counts = jax.lax.all_to_all(counts, AXIS, 0, 0, tiled=True)
    return received, received_counts


def _group_by_local_expert(received, received_counts):
    """The received rows [sources, M, D] as one array grouped by local expert (padding rows last, as a group
    of their own), and the permutation both ways."""
    _, m, d = received.shape
    slot = jnp.arange(m)
    source_ends = jnp.cumsum(received_counts, axis=1)
    row_expert = jax.vmap(lambda ends: jnp.searchsorted(ends, slot, side="right"))(source_ends).reshape(-1)
    regroup = jnp.argsort(row_expert, stable=True)
    ungroup = jnp.argsort(regroup)
    return permute_rows(received.reshape(-1, d), regroup, ungroup), regroup, ungroup


def _return_to_senders(out, counts):
    """The reverse all-to-all of `out` [sources * M, D] (rows in received order); -> this device's results
    [M, D] in expert-sorted order, read out of each shard's returned buffer."""
    shards = counts.shape[0]
    m = out.shape[0] // shards
    returned = jax.lax.all_to_all(out.reshape(shards, m, -1), AXIS, 0, 0, tiled=True)   # [shards, M, D]
    shard_counts, shard_start = _shard_slices(counts)
    slot = jnp.arange(m)
    computed_on = jnp.minimum(jnp.searchsorted(jnp.cumsum(shard_counts), slot, side="right"), shards - 1)
    return returned[computed_on, slot - shard_start[computed_on]]
