"""NF4 over an Orbax model checkpoint's layer slices: the abstract model (quantised or not) whose shapes and
logical axes the checkpoint follows, `quantize_base`'s bits for one layer (or one expert) at a time, each
weight's storage chunks on a mesh, and one layer's dequantisation. The JAX side of hf_to_orbax.py and
orbax_format.OrbaxSource, imported only when a checkpoint is NF4 or chunked for a mesh."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.checkpoints.orbax_keys import per_expert
from mixtral_jax.checkpoints.placement import named_params
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.model.nf4_base import NF4_MODES, quantize_model
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.quantization.nf4_weight import (
    NF4Weight,
    dequantize_weight,
    quantize_weight,
)

NF4_LEAVES = ("packed", "absmax", "absmax_q", "absmax_scale", "offset")  # an NF4Weight's arrays, as stored


def as_leaves(value):
    """An array, or an NF4 weight as a dict of its arrays ({packed, absmax}, or double-quantised {packed,
    absmax_q, absmax_scale, offset}): how it is stored."""
    if isinstance(value, NF4Weight):
        return {name: getattr(value, name) for name in NF4_LEAVES if getattr(value, name) is not None}
    return value


def abstract_model(config: MixtralConfig, lora: LoraConfig | None = None, quantize: str = "none") -> Mixtral:
    """The model's shapes, its base quantised as `quantize` says ("none", "nf4" or "nf4-plain")."""
    return nnx.eval_shape(lambda: quantize_model(Mixtral(config, rngs=nnx.Rngs(0), lora=lora), quantize))


def nf4_templates(config: MixtralConfig, quantize: str = "nf4") -> dict[str, NF4Weight]:
    """The abstract NF4 weight of each quantised parameter (stacked over layers): its arrays' shapes and its
    logical axes."""
    model = abstract_model(config, quantize=quantize)
    return {name: v.get_value() for name, v in named_params(model) if isinstance(v.get_value(), NF4Weight)}


def layer_quantizer(config: MixtralConfig, quantize: str = "nf4") -> Callable[[str, np.ndarray], dict[str, np.ndarray]]:
    """(param, one layer's slice, or one expert's matrix of it) -> its NF4 arrays (`as_leaves`), exactly
    `quantize_base`'s for that slice: the slice, or the expert's matrix, is one bitsandbytes tensor there too
    (an expert's blocks run along its rows, and its double quantisation is its own). Compiled once per
    parameter and shape: eager, XLA materialises every fp32 intermediate (several GB for a layer's experts at
    8x7B's widths)."""
    axes = {name: v.get_metadata()["logical_axes"] for name, v in named_params(abstract_model(config))}
    double_quant = NF4_MODES[quantize]
    compiled: dict[tuple, Callable] = {}

    def quantize_slice(param: str, array: np.ndarray) -> dict[str, np.ndarray]:
        key = (param, array.shape, str(array.dtype))
        if key not in compiled:
            compiled[key] = jax.jit(lambda x: quantize_weight(x[None], axes[param], leading=1,
                                                              double_quant=double_quant, tensors=1))
        return {name: np.asarray(a[0]) for name, a in as_leaves(compiled[key](array)).items()}

    return quantize_slice


def storage_chunks(config: MixtralConfig, quantize: str, mesh: str) -> dict[str, tuple | dict[str, tuple]]:
    """Our parameter name -> the chunk shape of the array it is stored as (one layer's slice, or one expert's
    matrix where the experts are stored one per key; a dict of shapes for an NF4 weight, as `as_leaves`): one
    device's shard of it on `mesh` (a spec such as "fsdp=2,expert=4", every size given: no devices needed),
    by the logical-axis rules. Restoring onto that mesh then reads each device's chunks alone."""
    from jax.sharding import AbstractMesh

    from mixtral_jax.parallel.sharding import (
        MESH_AXES,
        mesh_device_count,
        parse_mesh_spec,
        shardings_by_name,
    )

    sizes = parse_mesh_spec(mesh, mesh_device_count(mesh))
    model = abstract_model(config, quantize=quantize)
    shardings = shardings_by_name(model, AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES))
    chunks = {}
    for name, variable in named_params(model):
        stacked = 2 if per_expert(name, {"quantize": quantize}) else 1 if name.startswith("layers.") else 0
        chunks[name] = jax.tree.map(lambda leaf, s: s.shard_shape(leaf.shape)[stacked:],
                                    as_leaves(variable.get_value()), as_leaves(shardings[name]))
    return chunks


def dequantize_layer(template: NF4Weight, leaves: dict[str, np.ndarray]) -> np.ndarray:
    """One layer's slice of an NF4 weight (its stored arrays, as `as_leaves`), dequantised to its dtype."""
    q = template.replace(**{name: jnp.asarray(array) for name, array in leaves.items()})
    return np.asarray(dequantize_weight(q))


__all__ = ["NF4_LEAVES", "abstract_model", "as_leaves", "dequantize_layer", "layer_quantizer", "nf4_templates",
           "storage_chunks"]
