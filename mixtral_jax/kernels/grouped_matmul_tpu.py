"""The dropless experts' grouped product on TPUs, through JAX's Pallas megablox kernel.

Why: MaxText runs its Mixtral on megablox (`jax.experimental.pallas.ops.tpu.megablox`), and levanter measured
17% MFU with XLA's `ragged_dot` against 22% with a grouped-matmul kernel on TPU. megablox's `gmm` carries its
own custom_vjp: `gmm` with the weights transposed for the input gradient, `tgmm` for the weight gradient.
Off a TPU the kernel runs in Pallas interpret mode (slow; it is how the CPU tests check it).

The kernel takes bf16 and fp32 only, needs the rows to be a whole number of row tiles, and leaves the rows
past the last group unwritten (in the product and in the input gradient); `grouped_matmul` pads the rows,
zeroes those past the groups on the way in and out (as `ragged_dot` gives them: the expert-parallel path
pads its buffers) and slices back, so values and gradients are the kernel's exactly. Tiles never exceed
`TILES`; a column or contracted dimension that fits is one whole tile (a legal TPU block whatever its size).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

from mixtral_jax.kernels import select

_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_SUBLANES = 16  # a row tile's multiple: TPU blocks are (8, 128)-aligned, bf16 packs two rows per sublane
_LANES = 128


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The largest (rows, contracted, columns) tile. MaxText's megablox default is 512 on each side."""
    m: int = 512
    k: int = 512
    n: int = 512


TILES = Tiles()


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """megablox's tiling look-up, called by `gmm` and `tgmm` (forward and both gradients) with their own
    (m, k, n); hashable by value, as a static argument must be."""
    tm: int
    caps: Tiles

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        return self.tm, _tile(k, self.caps.k), _tile(n, self.caps.n)


def _tile(dim: int, cap: int) -> int:
    """The whole dimension if it fits, else the largest lane multiple up to `cap` that divides it, else `cap`
    (the kernel masks a last partial tile of k and n)."""
    if dim <= cap:
        return dim
    return next((t for t in range(cap - cap % _LANES, 0, -_LANES) if dim % t == 0), cap)


def _row_tile(m: int, cap: int) -> int:
    return min(cap, -(-max(m, 1) // _SUBLANES) * _SUBLANES)


def _in_groups(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x with the rows past the last group zeroed."""
    return jnp.where(jnp.arange(x.shape[0])[:, None] < jnp.sum(group_sizes), x, 0)


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N], group_sizes [G] summing to at most M -> [M, N]
    (rows past the groups: zero), in the inputs' dtype, accumulated in fp32."""
    m = rows.shape[0]
    out_dtype = jnp.result_type(rows, weights)
    compute = out_dtype if out_dtype in _KERNEL_DTYPES else jnp.dtype(jnp.float32)
    sizes = group_sizes.astype(jnp.int32)
    tm = _row_tile(m, TILES.m)
    padded = jnp.pad(rows.astype(compute), ((0, -m % tm), (0, 0)))
    out = megablox.gmm(_in_groups(padded, sizes), weights.astype(compute), sizes, preferred_element_type=compute,
                       tiling=_Tiling(tm, TILES), interpret=select.default_device().platform != "tpu")
    return _in_groups(out, sizes)[:m].astype(out_dtype)
