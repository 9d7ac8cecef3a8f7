"""A frozen base stored truly in 4 bits (QLoRA): NF4 weights, dequantised where the model reads them.

A weight whose last dimension is a multiple of 64 keeps its shape: `packed` [..., N/2] and `absmax`
[..., N/64], blocks of 64 along that dimension. Those are exactly bitsandbytes' blocks over the flattened
tensor (a block never crosses a row), and the arrays shard like the weight they replace. Other weights (the
router, [D, E]) are blocked over everything after their leading `layers` axis. Dequantisation happens inside
the jitted step, one layer at a time under the layer scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mixtral_jax.layout import QUANTIZED
from mixtral_jax.lora import LoRAParam
from mixtral_jax.quant import NF4_CODE, quantize_nf4

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
    codes = jnp.stack([q.packed >> 4, q.packed & 15], axis=-1).reshape(*q.packed.shape[:-1], -1)
    scales = jnp.repeat(q.absmax, BLOCK, axis=-1)
    values = jnp.asarray(NF4_CODE)[codes] * scales
    return values.reshape(*q.leading, *q.shape).astype(dtype or q.dtype)


def read(variable: nnx.Variable, dtype) -> jax.Array:
    """A parameter's value in `dtype`, dequantised if it is stored in NF4."""
    value = variable.get_value()
    if isinstance(value, NF4Weight):
        return dequantize_weight(value, dtype)
    return value.astype(dtype)


def quantize_base(model: nnx.Module, targets: tuple[str, ...] = QUANTIZED) -> nnx.Module:
    """Replaces the named frozen linear weights of the decoder layers by NF4 (in place; returns the model)."""
    for path, variable in nnx.iter_graph(model.layers):
        if isinstance(variable, nnx.Param) and not isinstance(variable, LoRAParam) and str(path[-1]) in targets:
            value = variable.get_value()
            if isinstance(value, NF4Weight):
                continue
            axes = variable.get_metadata()["logical_axes"]
            variable.set_value(quantize_weight(value, axes, leading=1))
    return model


def base_nbytes(model: nnx.Module) -> tuple[int, int]:
    """(bytes, parameters) of the frozen base as stored (NF4 weights at their packed size)."""
    total, count = 0, 0
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and not isinstance(variable, LoRAParam):
            value = variable.get_value()
            if isinstance(value, NF4Weight):
                total += value.nbytes
                count += int(np.prod(value.leading)) * int(np.prod(value.shape))
            else:
                total += value.size * value.dtype.itemsize
                count += value.size
    return total, count


__all__ = ["NF4Weight", "QUANTIZED", "base_nbytes", "dequantize_weight", "quantize_base", "quantize_weight", "read"]
