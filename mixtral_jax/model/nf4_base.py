"""A frozen base stored truly in 4 bits (QLoRA): the model's linear weights replaced by NF4 weights
(quantization/nf4_weight.py), dequantised where the model reads them, one layer at a time inside the
jitted step under the layer scan."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mixtral_jax.model.lora import LoRAParam
from mixtral_jax.model.targets import LINEAR_WEIGHTS
from mixtral_jax.parallel.sharding import constrain_as_used
from mixtral_jax.quantization.nf4_weight import (
    NF4Weight,
    dequantize_weight,
    quantize_weight,
)


def read(variable: nnx.Variable, dtype) -> jax.Array:
    """A parameter's value in `dtype`, dequantised if it is stored in NF4."""
    value = variable.get_value()
    if isinstance(value, NF4Weight):
        return dequantize_weight(_gathered(value), dtype)
    return value.astype(dtype)


def _gathered(q: NF4Weight) -> NF4Weight:
    """The codes and block scales gathered over `fsdp` before they are dequantised. FSDP gathers each weight
    where it is used; left to itself, XLA gathered the dequantised values, 8x the bytes of the 4-bit codes in
    fp32 (QLoRA, Mixtral-8x7B at fsdp=8, batch 8 x 1,024: 344 -> 47 GiB all-gathered per device and step,
    `mixtral-jax plan --qlora`)."""
    arrays = {name: constrain_as_used(array, q.axes[len(q.axes) - array.ndim:])
              for name in ("packed", "absmax", "absmax_q") if (array := getattr(q, name)) is not None}
    return q.replace(**arrays)


NF4_MODES = {"nf4": True, "nf4-plain": False}  # quantize setting -> double quantisation (bnb's default for QLoRA)


def quantize_base(model: nnx.Module, targets: tuple[str, ...] = LINEAR_WEIGHTS, *,
                  double_quant: bool = True) -> nnx.Module:
    """Replaces the named frozen linear weights of the decoder layers by NF4 (in place; returns the model),
    with bitsandbytes' double quantisation of the block scales unless `double_quant` is False. Weights that
    are NF4 already stay as they are."""
    for path, variable in nnx.iter_graph(model.layers):
        if isinstance(variable, nnx.Param) and not isinstance(variable, LoRAParam) and str(path[-1]) in targets:
            value = variable.get_value()
            if isinstance(value, NF4Weight):
                continue
            axes = variable.get_metadata()["logical_axes"]
            variable.set_value(quantize_weight(value, axes, leading=1, double_quant=double_quant))
    return model


def quantize_model(model: nnx.Module, quantize: str) -> nnx.Module:
    """The `quantize` setting applied: "none" leaves the model as it is, "nf4" quantises its base to NF4 with
    double quantisation, "nf4-plain" without."""
    if quantize == "none":
        return model
    if quantize not in NF4_MODES:
        raise ValueError(f"quantize must be none, {' or '.join(NF4_MODES)}, not {quantize!r}")
    return quantize_base(model, double_quant=NF4_MODES[quantize])


def base_nbytes(model: nnx.Module) -> tuple[int, int]:
    """(bytes, parameters) of the frozen base as stored (NF4 weights at their packed size, with their scales)."""
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


__all__ = ["NF4_MODES", "base_nbytes", "quantize_base", "quantize_model", "read"]
