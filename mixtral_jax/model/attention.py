"""Grouped-query self-attention with rotary positions, an optional sliding window and a KV cache.

Two kinds of position meet here. The *slot* of a token is its index in the sequence buffer (cache slot);
causality and the sliding window are decided on slots, as transformers' masks do. The *RoPE position* counts
only real tokens, so a left-padded prompt gets the same rotations as an unpadded one.

The mask is passed around as a `Visibility` (the slots and segments it is made of), not as the [B, T, S]
boolean array: with `attention_chunk` set, long inputs attend one block of queries at a time and build only
that block's mask, so neither the mask nor the scores ever exist whole ([B, T, S] is 16 GiB at T = S = 128K).
Splash attention (TPU) takes the segments and the window themselves, and needs no chunks.
"""

from __future__ import annotations

from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mixtral_jax.config import MixtralConfig
from mixtral_jax.kernels import attention_tpu
from mixtral_jax.kernels import select as kernels
from mixtral_jax.model.lora import LoraConfig, adapter_of, attach, project
from mixtral_jax.model.nf4_base import read
from mixtral_jax.parallel.sharding import active_mesh, logical_to_spec


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x [B, T, heads, hd], positions [B, T]; angles in fp32, result in x's dtype."""
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq               # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]         # [B, T, 1, hd]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def visibility_mask(query_slots: jax.Array, query_segments: jax.Array, key_segments: jax.Array,
                    sliding_window: int | None) -> jax.Array:
    """[B, T, S] bool: key slot s is visible from query slot t (causal, inside the window, same segment).

    Segments are ints, 0 for padding or an empty slot: a plain 0/1 mask is one segment per row, packed
    samples are 1, 2, 3, ... so that attention never crosses samples. A padding query sees every real key
    before it, as transformers' masks let it (its output is never used, but it must not be NaN).
    """
    key_slots = jnp.arange(key_segments.shape[-1])
    visible = key_slots[None, None, :] <= query_slots[:, :, None]
    if sliding_window is not None:
        visible &= key_slots[None, None, :] > query_slots[:, :, None] - sliding_window
    same = (key_segments[:, None, :] == query_segments[:, :, None]) | (query_segments[:, :, None] == 0)
    return visible & same & (key_segments[:, None, :] > 0)


@flax.struct.dataclass
class Visibility:
    """Which keys each query sees, kept as what it is computed from ([B, T] and [B, S] ints): `mask()` is
    `visibility_mask`'s [B, T, S] array; the chunked attention builds one block of query rows at a time."""

    query_slots: jax.Array     # [B, T] int: slot of each query
    query_segments: jax.Array  # [B, T] int: segment of each query (0: padding)
    key_segments: jax.Array    # [B, S] int: segment of each key slot (0: padding or empty)
    sliding_window: int | None = flax.struct.field(pytree_node=False, default=None)

    def mask(self) -> jax.Array:
        return visibility_mask(self.query_slots, self.query_segments, self.key_segments, self.sliding_window)


def visibility(query_slots: jax.Array, query_segments: jax.Array, key_segments: jax.Array,
               sliding_window: int | None) -> Visibility:
    """The attention mask of one forward pass (the same for every layer), unmaterialised; see `Visibility`."""
    return Visibility(query_slots, query_segments, key_segments, sliding_window)


class Attention(nnx.Module):
    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        d, hd = config.hidden_size, config.resolved_head_dim
        h, kv = config.num_attention_heads, config.num_key_value_heads
        pdtype = jnp.dtype(config.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        self.config = config
        self.q_proj = nnx.Param(init(rngs.params(), (d, h, hd), pdtype), logical_axes=("embed", "heads", "head_dim"))
        self.k_proj = nnx.Param(init(rngs.params(), (d, kv, hd), pdtype),
                                logical_axes=("embed", "kv_heads", "head_dim"))
        self.v_proj = nnx.Param(init(rngs.params(), (d, kv, hd), pdtype),
                                logical_axes=("embed", "kv_heads", "head_dim"))
        self.o_proj = nnx.Param(init(rngs.params(), (h, hd, d), pdtype), logical_axes=("heads", "head_dim", "embed"))
        self.lora = lora
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = getattr(self, name)
            attach(self, name, weight.shape, 1, weight.get_metadata()["logical_axes"], lora, rngs)
        attach(self, "o_proj", self.o_proj.shape, 2, self.o_proj.get_metadata()["logical_axes"], lora, rngs)

    def __call__(self, x, positions, mask, cache_kv=None, first_slot=None, dropout_key=None):
        """x [B, T, D]; positions [B, T]; mask: a `Visibility` (or a [B, T, S] bool array), the same for every layer.

        Without a cache the keys are this call's own tokens (S = T). With `cache_kv` = (k, v), each
        [B, S, kv_heads, hd], this call's keys are written from slot `first_slot` on (the same for every
        row) and attention runs over the whole buffer. Returns (output [B, T, D], (k, v)).
        """
        cfg = self.config
        dtype = x.dtype
        q, k, v = (project(x, read(getattr(self, name), dtype), adapter_of(self, name, dtype, dropout_key), 1)
                   for name in ("q_proj", "k_proj", "v_proj"))
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        if cache_kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.astype(cache_kv[0].dtype), first_slot, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.astype(cache_kv[1].dtype), first_slot, axis=1)
        out = attend(q, k.astype(dtype), v.astype(dtype), mask, cfg.attention_chunk, cfg.attention_implementation,
                     cached=cache_kv is not None)
        return project(out, read(self.o_proj, dtype), adapter_of(self, "o_proj", dtype, dropout_key), 2), (k, v)


def grouped_query_attention(q, k, v, mask, implementation: str = "auto"):
    """q [B, T, H, hd], k/v [B, S, KV, hd], mask [B, T, S]; scaled by hd**-0.5, scores and softmax in fp32.

    `implementation="cudnn"` is cuDNN's fused (flash) attention on NVIDIA GPUs, bf16/fp16 only: the scores
    are never materialised; the mask travels as an additive bias. Splash takes no mask: XLA's attention here."""
    implementation = kernels.attention_implementation(implementation, q.dtype)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                        implementation="xla" if implementation == "splash" else implementation)


def attend(q, k, v, mask, chunk: int | None = None, implementation: str = "auto", cached: bool = False):
    """Attention under a `Visibility` or a [B, T, S] bool mask; with `chunk` set and T > chunk, in query
    blocks of `chunk` rows (`chunked_attention`), which gives the same numbers in O(chunk * S) memory.

    "splash" runs `splash_self_attention` on a `Visibility` of a pass without a KV cache (`cached` False: the
    keys are the queries' own tokens, query slot t is key slot t); with a cache or a bool mask, XLA's."""
    splash = kernels.attention_implementation(implementation, q.dtype) == "splash"
    if isinstance(mask, Visibility) and splash and not cached:
        return splash_self_attention(q, k, v, mask)
    if isinstance(mask, Visibility):
        if chunk is not None and q.shape[1] > chunk:
            return chunked_attention(q, k, v, mask, chunk, implementation)
        mask = mask.mask()
    return grouped_query_attention(q, k, v, mask, implementation)


def chunked_attention(q, k, v, visible: Visibility, chunk: int, implementation: str = "auto"):
    """q [B, T, H, hd], k/v [B, S, KV, hd]: `jax.lax.map` over blocks of `chunk` queries, each attending to
    every key with its own [B, chunk, S] mask built from slots and segments inside the loop. Peak memory is
    one block's scores, [B, H, chunk, S] fp32, instead of [B, H, T, S]. T is padded to a multiple of `chunk`
    with padding queries (segment 0, the last real slot), whose rows are dropped."""
    batch, length, heads, head_dim = q.shape
    blocks = -(-length // chunk)
    pad = blocks * chunk - length
    slots, segments = visible.query_slots, visible.query_segments
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        slots = jnp.pad(slots, ((0, 0), (0, pad)), mode="edge")
        segments = jnp.pad(segments, ((0, 0), (0, pad)))

    def blocked(a):  # [B, blocks * chunk, ...] -> [blocks, B, chunk, ...]
        return jnp.swapaxes(a.reshape(batch, blocks, chunk, *a.shape[2:]), 0, 1)

    def one_block(inputs):
        q_block, slot_block, segment_block = inputs
        mask = visibility_mask(slot_block, segment_block, visible.key_segments, visible.sliding_window)
        return grouped_query_attention(q_block, k, v, mask, implementation)

    out = jax.lax.map(one_block, (blocked(q), blocked(slots), blocked(segments)))  # [blocks, B, chunk, H, hd]
    return jnp.swapaxes(out, 0, 1).reshape(batch, blocks * chunk, heads, head_dim)[:, :length]


def splash_self_attention(q, k, v, visible: Visibility):
    """`attention_tpu.splash_attention` of a pass without a cache. On a mesh, per shard (shard_map: Mosaic
    kernels are not partitioned automatically): rows split by batch, heads by `tensor` where the query and
    KV heads split alike (each shard's query heads then find their KV heads on it), else every head."""
    run = partial(attention_tpu.splash_attention, sliding_window=visible.sliding_window)
    args = (q, k, v, visible.query_segments, visible.key_segments)
    if active_mesh() is None:
        return run(*args)
    mesh, rules = active_mesh()
    q_spec = logical_to_spec(("batch", None, "act_heads", None), q.shape, mesh, rules)
    kv_spec = logical_to_spec(("batch", None, "act_kv_heads", None), k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:
        q_spec = kv_spec = PartitionSpec(q_spec[0], None, None, None)
    rows = PartitionSpec(q_spec[0], None)
    return jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows, rows), out_specs=q_spec,
                         check_vma=False)(*args)
