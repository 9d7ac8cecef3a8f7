"""The dropless experts' grouped product through tokamax's `ragged_dot` (Google's Pallas kernel library; the
optional extra `gpu`): a candidate to replace gmm_gpu, `grouped_matmul="tokamax"`, measured against it by
`python -m bench.bench_gpu_kernels --tokamax`.

tokamax's own default tries its implementations in turn and takes the first that does not raise
NotImplementedError, so a kernel that refuses a product would quietly become XLA's ragged_dot, which on a GPU
multiplies every row by every group's weight. We name one instead: "mosaic_gpu" (its Pallas Mosaic GPU
kernels, with their own gradients: the product for the input gradient, a ragged-contracting kernel for the
weight gradient; unlike gmm_gpu's, both copy an operand transposed first) where "auto" picks our Mosaic GPU
kernels (Hopper), for the products those kernels take; "xla" (`jax.lax.ragged_dot_general` accumulated in
fp32) for the others and on every other device (tokamax's TPU kernel is not wired here: megablox is ours).

The Mosaic GPU kernels leave the rows past the last group unwritten, in the product and in the input
gradient; `ragged_dot` gives zeros (expert parallelism pads its buffers), so those rows are zeroed on the way
in and out: the input's `where` clears their gradient too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.errors import ConfigError
from mixtral_jax.kernels import select

_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_BLOCK_K = 128  # tokamax 0.0.12's sm90 heuristic; no H200 entry in its autotuning cache


def load_tokamax():
    """The tokamax module, ready to call. Its options are absl flags which, unless parsed already, it parses
    on first use from sys.argv, and any other command line (ours, pytest's) fails there: marked parsed, they
    keep their defaults (autotuning cache, else heuristics; never autotuning on the way)."""
    try:
        import tokamax
        from absl import flags
    except ImportError:
        raise ConfigError("grouped_matmul 'tokamax' needs the tokamax package: pip install "
                          "'mixtral-jax[gpu]' (tokamax==0.0.12)") from None
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _kernel_takes(rows: jax.Array, weights: jax.Array) -> bool:
    """The sm90 kernel takes bf16 or fp16 alike, and walks the contracted width in whole blocks of
    min(width, 128) without checking the remainder (a width of 192 would lose its last 64 columns). The
    input gradient contracts over the columns: both widths must be 64 or a multiple of 128."""
    same_dtype = rows.dtype == weights.dtype and jnp.dtype(rows.dtype) in _KERNEL_DTYPES
    return same_dtype and all(width == 64 or width % _BLOCK_K == 0 for width in weights.shape[1:])


def implementation(rows: jax.Array, weights: jax.Array) -> str:
    """The tokamax implementation `grouped_matmul` names for this product on the default device."""
    on_hopper = select.grouped_matmul_kind("auto") == "mosaic_gpu"
    return "mosaic_gpu" if on_hopper and _kernel_takes(rows, weights) else "xla"


def _in_groups(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    return jnp.where(jnp.arange(x.shape[0])[:, None] < jnp.sum(group_sizes), x, 0)


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N], group_sizes [G] summing to at most M -> [M, N]
    (rows past the groups: zero), in the inputs' dtype, accumulated in fp32."""
    tokamax = load_tokamax()
    sizes = group_sizes.astype(jnp.int32)
    kind = implementation(rows, weights)
    if kind == "xla":
        return tokamax.ragged_dot(rows, weights, sizes, implementation=kind)
    out = tokamax.ragged_dot(_in_groups(rows, sizes), weights, sizes, implementation=kind)
    return _in_groups(out, sizes)
