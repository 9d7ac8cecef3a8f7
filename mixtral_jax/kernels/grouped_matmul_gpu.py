"""The dropless experts' grouped product on Hopper GPUs (H100, H200), through JAX's Pallas Mosaic GPU kernels.

Why: XLA's GPU `ragged_dot` multiplies every row by every group's weight and masks, so Mixtral's experts cost
as many FLOPs as eight dense FFNs (on an H100 the bench-1b step spent ~350 of its 569 ms there).
`jax.experimental.pallas.ops.gpu` ships wgmma kernels that visit each row's own group only: `ragged_dot` for
the product and the input gradient (weights transposed), `transposed_ragged_dot` for the weight gradient.
`grouped_matmul` joins them into one differentiable product. A product whose shapes or dtypes the kernels'
tiles do not take (fp32, a LoRA rank below 64) falls back to `jax.lax.ragged_dot`, product by product.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_BLOCK_N_CHOICES = (128, 64)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The kernels' tiles. Tuned on an H200 at bench-1b's shapes (`python -m bench.bench_gpu_kernels --sweep`,
    bench/results-gpu-h200.json): 6 pipeline stages (the most that fit shared memory at these tiles) and output
    tiles walked 2 columns wide were ~15% faster than 4 and 1."""
    block_m: int = 128
    block_k: int = 64
    pipeline_steps: int = 6
    grid_block_n: int = 2


TILES = Tiles()


def _ragged_kernel(lhs, rhs, **kwargs):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, **kwargs)


def _transposed_kernel(lhs, rhs, **kwargs):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, rhs, **kwargs)


def _kernel_dtype(*arrays) -> bool:
    return len({a.dtype for a in arrays}) == 1 and jnp.dtype(arrays[0].dtype) in _KERNEL_DTYPES


def _tiles(block_n: int, columns: int) -> dict:
    grid_block_n = TILES.grid_block_n if columns % (TILES.grid_block_n * block_n) == 0 else 1
    return dict(block_m=TILES.block_m, block_n=block_n, block_k=TILES.block_k,
                max_concurrent_steps=TILES.pipeline_steps, grid_block_n=grid_block_n)


def _block_n(columns: int) -> int | None:
    return next((b for b in _BLOCK_N_CHOICES if columns % b == 0), None)


def _product(rows, weights, group_sizes, transpose_weights: bool):
    """rows [M, K] by group x weights [G, K, N] (or [G, N, K] transposed) -> [M, N]."""
    contracted, columns = (weights.shape[2], weights.shape[1]) if transpose_weights else weights.shape[1:]
    block_n = _block_n(columns)
    if block_n is None or contracted % TILES.block_k or not _kernel_dtype(rows, weights):
        rhs = jnp.swapaxes(weights, 1, 2) if transpose_weights else weights
        return jax.lax.ragged_dot(rows, rhs, group_sizes)
    out = _ragged_kernel(rows, weights, group_sizes=group_sizes, transpose_rhs=transpose_weights,
                         **_tiles(block_n, columns))
    # The kernel leaves rows past the last group unwritten; ragged_dot's are zero (expert parallelism pads).
    return jnp.where(jnp.arange(rows.shape[0])[:, None] < jnp.sum(group_sizes), out, 0)


def _weight_gradient(rows, grad, group_sizes):
    """[G, K, N]: per group, rows_g^T @ grad_g, accumulated in fp32 on both paths."""
    block_n = _block_n(grad.shape[1])
    if block_n is None or rows.shape[1] % TILES.block_m or not _kernel_dtype(rows, grad):
        numbers = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                    lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        out = jax.lax.ragged_dot_general(rows, grad, group_sizes, numbers, preferred_element_type=jnp.float32)
        return out.astype(rows.dtype)
    return _transposed_kernel(rows, grad, group_sizes=group_sizes, **_tiles(block_n, grad.shape[1]))


@jax.custom_vjp
def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [M, K] sorted by group, weights [G, K, N], group_sizes [G] int32 summing to M -> [M, N]."""
    return _product(rows, weights, group_sizes.astype(jnp.int32), transpose_weights=False)


def _forward(rows, weights, group_sizes):
    return grouped_matmul(rows, weights, group_sizes), (rows, weights, group_sizes)


def _backward(residuals, grad):
    rows, weights, group_sizes = residuals
    sizes = group_sizes.astype(jnp.int32)
    grad = grad.astype(rows.dtype)
    d_rows = _product(grad, weights.astype(rows.dtype), sizes, transpose_weights=True)
    d_weights = _weight_gradient(rows, grad, sizes).astype(weights.dtype)
    return d_rows, d_weights, None


grouped_matmul.defvjp(_forward, _backward)
