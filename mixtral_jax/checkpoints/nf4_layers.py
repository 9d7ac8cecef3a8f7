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
from mixtral_jax.model.nf4_base import quantize_base
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.quantization.nf4_weight import (
    NF4Weight,
    dequantize_weight,
    quantize_weight,
)


def as_leaves(value):
    """An array, or an NF4 weight as {packed, absmax} (how it is stored)."""
    if isinstance(value, NF4Weight):
        return {"packed": value.packed, "absmax": value.absmax}
    return value


def abstract_model(config: MixtralConfig, lora: LoraConfig | None = None, quantize: str = "none") -> Mixtral:
    def build():
        model = Mixtral(config, rngs=nnx.Rngs(0), lora=lora)
        return quantize_base(model) if quantize == "nf4" else model

    return nnx.eval_shape(build)


def nf4_templates(config: MixtralConfig) -> dict[str, NF4Weight]:
    """The abstract NF4 weight of each quantised parameter (stacked over layers): its arrays' shapes and its
    logical axes."""
    model = abstract_model(config, quantize="nf4")
    return {name: v.get_value() for name, v in named_params(model) if isinstance(v.get_value(), NF4Weight)}


def layer_quantizer(config: MixtralConfig) -> Callable[[str, np.ndarray], dict[str, np.ndarray]]:
    """(param, one layer's slice, or one expert's matrix of it) -> its NF4 arrays {"packed", "absmax"},
    exactly `quantize_base`'s for that slice (an expert's blocks run along its rows, so quantising the experts
    one by one gives the layer's bits). Compiled once per parameter and shape: eager, XLA materialises every
    fp32 intermediate (several GB for a layer's experts at 8x7B's widths)."""
    axes = {name: v.get_metadata()["logical_axes"] for name, v in named_params(abstract_model(config))}
    compiled: dict[tuple, Callable] = {}

    def quantize(param: str, array: np.ndarray) -> dict[str, np.ndarray]:
        key = (param, array.shape, str(array.dtype))
        if key not in compiled:
            compiled[key] = jax.jit(lambda x: quantize_weight(x[None], axes[param], leading=1))
        q = compiled[key](array)
        return {"packed": np.asarray(q.packed[0]), "absmax": np.asarray(q.absmax[0])}

    return quantize


def storage_chunks(config: MixtralConfig, quantize: str, mesh: str) -> dict[str, tuple | dict[str, tuple]]:
    """Our parameter name -> the chunk shape of the array it is stored as (one layer's slice, or one expert's
    matrix where the experts are stored one per key; {"packed", "absmax"} shapes for an NF4 weight): one
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
    """One layer's slice of an NF4 weight (its stored {"packed", "absmax"}), dequantised to its dtype."""
    q = template.replace(packed=jnp.asarray(leaves["packed"]), absmax=jnp.asarray(leaves["absmax"]))
    return np.asarray(dequantize_weight(q))


__all__ = ["abstract_model", "as_leaves", "dequantize_layer", "layer_quantizer", "nf4_templates", "storage_chunks"]
