"""Causal grouped-query attention on TPU through JAX's splash attention kernel (Pallas, Mosaic TPU).

Why: XLA's attention materialises the [B, H, T, S] fp32 scores (2 GiB per layer for one 4K-token row of
Mixtral-8x7B's 32 heads, 128 GiB at 32K), and computes the blocks the causal mask or the window hides. Splash attention
is a flash attention: it walks the scores block by block in on-chip memory with an online softmax, keeps
only the log-sum-exp for its backward kernels, and skips the blocks its static mask hides. MaxText runs
Mixtral-8x7B's attention on it. Off TPU it runs in Pallas interpret mode (slow; for tests).

The kernel takes one static [T, T] mask (causal, or the local window) and, per row, the segment ids it
compares for equality; see `splash_query_segments` for the padding queries. It scales nothing: q is
scaled by hd**-0.5 here. The Pallas modules are imported when first used (they cost import time).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.kernels import select

LANES = 128                      # the kernel's smallest block: segment ids are tiled over 128 lanes
BLOCK_CHOICES = (512, 256, LANES)  # the largest that divides the length rounded up to LANES


def splash_attention(q, k, v, query_segments, key_segments, sliding_window: int | None = None,
                     block: int | None = None):
    """q [B, T, H, hd], k/v [B, T, KV, hd] (H a multiple of KV), segments [B, T] ints (0: padding), query
    slot t = key slot t = t: `visibility_mask`'s attention without the [B, T, T] mask. T is padded to a
    multiple of `block` (default: from BLOCK_CHOICES) with padding keys, and the padded rows dropped."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = q.shape
    block = block or next(b for b in BLOCK_CHOICES if _round_up(length, LANES) % b == 0)
    padded = _round_up(length, block)
    kernel = _kernel(padded, heads, sliding_window, block, select.default_device().platform != "tpu")
    segments = splash.SegmentIds(q=_pad(splash_query_segments(query_segments, key_segments, sliding_window), padded),
                                 kv=_pad(key_segments, padded))
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    q, k, v = (jnp.swapaxes(_pad(x, padded), 1, 2) for x in (q, k, v))   # [B, heads, T, hd]
    out = jax.vmap(kernel)(q, k, v, segments)
    return jnp.swapaxes(out, 1, 2)[:, :length]


def splash_query_segments(query_segments, key_segments, sliding_window: int | None):
    """The segment ids splash compares with the keys' for each query: its own for a real query.

    Splash sees key s from query t when their ids are equal. `visibility_mask` lets a padding query (0) see
    every real key before it; here it takes the segment of the last real key at or before it (the same keys
    when a row holds one sample: its padding rows are XLA's too), or, when there is none inside its window,
    stays 0 and sees the padding keys there, itself at least, so no row is empty (the kernel would not divide
    by zero, its mask value is finite, but would average whatever its blocks hold). Only padding rows differ
    from `visibility_mask`'s, and nothing real reads them (real queries never see padding keys), so real
    outputs and all gradients through real outputs are the same.
    """
    slots = jnp.arange(key_segments.shape[1])
    last_real = jax.lax.cummax(jnp.where(key_segments > 0, slots, -1), axis=1)
    near = last_real >= 0
    if sliding_window is not None:
        near &= slots - last_real < sliding_window
    inherited = jnp.take_along_axis(key_segments, jnp.maximum(last_real, 0), axis=1)
    return jnp.where(query_segments > 0, query_segments, jnp.where(near, inherited, 0))


def _kernel(length: int, heads: int, sliding_window: int | None, block: int, interpret: bool):
    """The splash kernel of one [T, T] causal (or local) mask; splash caches the mask's block map (numpy)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (length, length)
    mask = (splash.CausalMask(shape) if sliding_window is None else
            splash.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x, length: int):
    """Pads axis 1 with zeros (segment 0: padding) up to `length`."""
    return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
