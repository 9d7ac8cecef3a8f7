"""NF4 weights: a weight stored truly in 4 bits as bitsandbytes stores it, and back.

A weight whose last dimension is a multiple of 64 keeps its shape: `packed` [..., N/2] and its block scales
[..., N/64], blocks of 64 along that dimension. Those are exactly bitsandbytes' blocks over the flattened
tensor (a block never crosses a row), and the arrays shard like the weight they replace. Other weights (the
router, [D, E]) are blocked over everything after their leading `layers` axis.

The block scales are stored as bitsandbytes' double quantisation stores them (`bnb_4bit_use_double_quant`,
QLoRA's and Chinese-Mixtral's setting; ~4.127 bits per parameter), or plainly in fp32 (4.5 bits). Double
quantisation works per bitsandbytes tensor: each layer's slice of a weight is one tensor, and each expert's
matrix of w1, w2, w3 is one too (transformers' legacy Mixtral has one nn.Linear per expert). A tensor's
scales, flattened in its own order, are cut into groups of 256, each with its fp32 scale (`absmax_scale`),
around the tensor's mean (`offset`); their 8-bit codes (`absmax_q`) keep the shape (and sharding) the fp32
scales would have.
"""

from __future__ import annotations

import jax
from flax import struct

from mixtral_jax.quantization.nf4 import (
    dequantize_absmax,
    dequantize_blocks,
    quantize_nf4,
)

BLOCK = 64


@struct.dataclass
class NF4Weight:
    packed: jax.Array                                    # uint8
    absmax: jax.Array | None                             # fp32, one per block of 64 (None: double-quantised)
    shape: tuple = struct.field(pytree_node=False)       # the weight's shape without leading (scanned) axes
    dtype: str = struct.field(pytree_node=False)
    axes: tuple = struct.field(pytree_node=False)        # logical axes of packed and absmax (absmax_q)
    by_rows: bool = struct.field(pytree_node=False)      # blocks along the last dim (else over the flat slice)
    absmax_q: jax.Array | None = None       # uint8, shaped like absmax: 8-bit codes of each absmax - offset
    absmax_scale: jax.Array | None = None   # fp32 [*tensors, ceil(blocks per tensor / 256)]
    offset: jax.Array | None = None         # fp32 [*tensors, 1]: the mean of each tensor's absmax values

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def leading(self) -> tuple:
        """The stacked axes still present (the layer axis outside the layer scan, none inside)."""
        return self.packed.shape[: self.packed.ndim - (len(self.shape) if self.by_rows else 1)]

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in (self.packed, self.absmax, self.absmax_q, self.absmax_scale,
                                                        self.offset) if a is not None)


def bnb_tensor_axes(logical_axes: tuple, leading: int) -> int:
    """How many leading axes index separate bitsandbytes tensors: the stacked ones, and the experts after them."""
    return leading + int(len(logical_axes) > leading and logical_axes[leading] == "experts")


def quantize_weight(weight: jax.Array, logical_axes: tuple, leading: int = 1, double_quant: bool = True,
                    tensors: int | None = None) -> NF4Weight:
    """NF4 of a stacked weight [L, ...]: each slice quantised as bitsandbytes would, one tensor per index of the
    first `tensors` axes (default `bnb_tensor_axes`: the `leading` ones, and an experts axis after them).
    `double_quant` also quantises the block scales (bitsandbytes' compress_statistics=True)."""
    shape, lead = weight.shape[leading:], weight.shape[:leading]
    tensors = bnb_tensor_axes(tuple(logical_axes), leading) if tensors is None else tensors
    by_rows = shape[-1] % BLOCK == 0
    if tensors < leading:
        raise ValueError(f"tensors ({tensors}) must cover the {leading} leading axes")
    flat = weight.reshape(*weight.shape[:tensors], -1)
    if flat.shape[-1] % BLOCK:
        raise ValueError(f"cannot quantise a weight of shape {weight.shape}: {flat.shape[-1]} values per tensor "
                         f"are not a multiple of {BLOCK}")
    quantize = lambda x: quantize_nf4(x, BLOCK, double_quant)
    for _ in range(tensors):
        quantize = jax.vmap(quantize)
    q = quantize(flat)
    rows = (*lead, *shape[:-1]) if by_rows else lead  # a tensor's blocks, in its order, fill these rows
    scales = (q.absmax_q if double_quant else q.absmax).reshape(*rows, -1)
    common = dict(packed=q.packed.reshape(*rows, -1), shape=tuple(shape), dtype=str(weight.dtype),
                  axes=tuple(logical_axes) if by_rows else (*logical_axes[:leading], None), by_rows=by_rows)
    if not double_quant:
        return NF4Weight(absmax=scales, **common)
    return NF4Weight(absmax=None, absmax_q=scales, absmax_scale=q.absmax_scale, offset=q.offset[..., None],
                     **common)


def block_scales(q: NF4Weight) -> jax.Array:
    """The fp32 scale of every block, shaped like `absmax` (rebuilt per tensor under double quantisation)."""
    if not q.double_quant:
        return q.absmax
    tensors = q.offset.shape[:-1]
    codes = q.absmax_q.reshape(*tensors, -1)  # each tensor's codes in its own (flat) order
    return dequantize_absmax(codes, q.absmax_scale, q.offset[..., 0]).reshape(q.absmax_q.shape)


def dequantize_weight(q: NF4Weight, dtype=None) -> jax.Array:
    """code[nibble] * absmax in fp32, cast to `dtype` (bitsandbytes' dequantize_4bit), in the weight's shape."""
    values = dequantize_blocks(q.packed, block_scales(q))
    return values.reshape(*q.leading, *q.shape).astype(dtype or q.dtype)


__all__ = ["BLOCK", "NF4Weight", "block_scales", "bnb_tensor_axes", "dequantize_weight", "quantize_weight"]
