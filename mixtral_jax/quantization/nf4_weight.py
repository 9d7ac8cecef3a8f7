"""NF4 weights: a weight stored truly in 4 bits as bitsandbytes stores it, and back.

A weight whose last dimension is a multiple of 64 keeps its shape: `packed` [..., N/2] and `absmax`
[..., N/64], blocks of 64 along that dimension. Those are exactly bitsandbytes' blocks over the flattened
tensor (a block never crosses a row), and the arrays shard like the weight they replace. Other weights (the
router, [D, E]) are blocked over everything after their leading `layers` axis.
"""

from __future__ import annotations

import jax
from flax import struct

from mixtral_jax.quantization.nf4 import dequantize_blocks, quantize_nf4

BLOCK = 64


@struct.dataclass
class NF4Weight:
    packed: jax.Array                                    # uint8
    absmax: jax.Array                                    # fp32, one per block of 64
    shape: tuple = struct.field(pytree_node=False)       # the weight's shape without leading (scanned) axes
    dtype: str = struct.field(pytree_node=False)
    axes: tuple = struct.field(pytree_node=False)        # logical axes of packed and absmax
    by_rows: bool = struct.field(pytree_node=False)      # blocks along the last dim (else over the flat slice)

    @property
    def leading(self) -> tuple:
        """The stacked axes still present (the layer axis outside the layer scan, none inside)."""
        return self.packed.shape[: self.packed.ndim - (len(self.shape) if self.by_rows else 1)]

    @property
    def nbytes(self) -> int:
        return self.packed.size * self.packed.dtype.itemsize + self.absmax.size * self.absmax.dtype.itemsize


def quantize_weight(weight: jax.Array, logical_axes: tuple, leading: int = 1) -> NF4Weight:
    """NF4 of a stacked weight [L, ...]: each of the `leading` slices quantised as bitsandbytes would."""
    shape, lead = weight.shape[leading:], weight.shape[:leading]
    by_rows = shape[-1] % BLOCK == 0
    flat = weight.reshape(*lead, -1)
    if flat.shape[-1] % BLOCK:
        raise ValueError(f"cannot quantise a weight of shape {weight.shape}: {flat.shape[-1]} values per slice "
                         f"are not a multiple of {BLOCK}")
    quantize = lambda x: quantize_nf4(x, BLOCK)
    for _ in range(leading):
        quantize = jax.vmap(quantize)
    q = quantize(flat)
    if by_rows:
        packed = q.packed.reshape(*lead, *shape[:-1], shape[-1] // 2)
        absmax = q.absmax.reshape(*lead, *shape[:-1], shape[-1] // BLOCK)
        axes = tuple(logical_axes)
    else:
        packed, absmax = q.packed, q.absmax
        axes = (*logical_axes[:leading], None)
    return NF4Weight(packed=packed, absmax=absmax, shape=tuple(shape), dtype=str(weight.dtype), axes=axes,
                     by_rows=by_rows)


def dequantize_weight(q: NF4Weight, dtype=None) -> jax.Array:
    """code[nibble] * absmax in fp32, cast to `dtype` (bitsandbytes' dequantize_4bit), in the weight's shape."""
    values = dequantize_blocks(q.packed, q.absmax)
    return values.reshape(*q.leading, *q.shape).astype(dtype or q.dtype)


__all__ = ["BLOCK", "NF4Weight", "dequantize_weight", "quantize_weight"]
