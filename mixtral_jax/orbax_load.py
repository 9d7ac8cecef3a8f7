"""Restoring an Orbax model checkpoint (orbax_model.py) onto devices: each of our stacked parameters from its
L layer slices, each restored straight onto the target sharding (the parameter's sharding without its layers
axis, any mesh; an expert's matrix without the layers and experts axes), then stacked on the devices: peak
memory is the model plus one parameter. Also the NF4 arrays' quantisation and dequantisation for the
host-side reader and writer there, the only parts of those that need JAX.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from tqdm.auto import tqdm

from mixtral_jax.config import MixtralConfig
from mixtral_jax.hf_checkpoint import _named_params, _placement
from mixtral_jax.lora import LoRAParam, LoraConfig, init_adapters
from mixtral_jax.model import Mixtral
from mixtral_jax.orbax_model import Weights, expert_key, leaf_key, lookup, nest, per_expert, read_config
from mixtral_jax.quantized import NF4Weight, dequantize_weight, quantize_base, quantize_weight


def _as_leaves(value):
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
    return {name: v.get_value() for name, v in _named_params(model) if isinstance(v.get_value(), NF4Weight)}


def layer_quantizer(config: MixtralConfig) -> Callable[[str, np.ndarray], dict[str, np.ndarray]]:
    """(param, one layer's slice, or one expert's matrix of it) -> its NF4 arrays {"packed", "absmax"},
    exactly `quantize_base`'s for that slice (an expert's blocks run along its rows, so quantising the experts
    one by one gives the layer's bits). Compiled once per parameter and shape: eager, XLA materialises every
    fp32 intermediate (several GB for a layer's experts at 8x7B's widths)."""
    axes = {name: v.get_metadata()["logical_axes"] for name, v in _named_params(abstract_model(config))}
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

    from mixtral_jax.sharding import MESH_AXES, mesh_device_count, parse_mesh_spec, shardings_by_name

    sizes = parse_mesh_spec(mesh, mesh_device_count(mesh))
    model = abstract_model(config, quantize=quantize)
    shardings = shardings_by_name(model, AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES))
    chunks = {}
    for name, variable in _named_params(model):
        stacked = 2 if per_expert(name, {"quantize": quantize}) else 1 if name.startswith("layers.") else 0
        chunks[name] = jax.tree.map(lambda leaf, s: s.shard_shape(leaf.shape)[stacked:],
                                    _as_leaves(variable.get_value()), _as_leaves(shardings[name]))
    return chunks


def dequantize_layer(template: NF4Weight, leaves: dict[str, np.ndarray]) -> np.ndarray:
    """One layer's slice of an NF4 weight (its stored {"packed", "absmax"}), dequantised to its dtype."""
    q = template.replace(packed=jnp.asarray(leaves["packed"]), absmax=jnp.asarray(leaves["absmax"]))
    return np.asarray(dequantize_weight(q))


def _without_layer_axis(sharding):
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
    return sharding


def load(directory: str | os.PathLike, dtype: str | None = None, *, mesh=None, lora: LoraConfig | None = None,
         lora_seed: int = 0, show_progress: bool = False, **implementation) -> Mixtral:
    """The model of an Orbax model checkpoint (`from_pretrained` dispatches here), each parameter restored
    with its sharding on `mesh` (default: the first device). `dtype` casts the unquantised weights."""
    directory = os.fspath(directory)
    config, marker = read_config(directory, dtype, **implementation)
    stored_dtype = jnp.dtype(marker["dtype"])
    weights = Weights(directory, marker)
    model = abstract_model(config, lora, marker["quantize"])
    if mesh is not None:
        from mixtral_jax.sharding import shardings_by_name

        shardings = shardings_by_name(model, mesh)
    else:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = {name: jax.tree.map(lambda _: device, _as_leaves(v.get_value()))
                     for name, v in _named_params(model)}
    layers = config.num_hidden_layers
    for name, variable in tqdm(list(_named_params(model)), desc=f"loading {os.path.basename(directory)}",
                               disable=not show_progress):
        value = variable.get_value()
        leaves, target = _as_leaves(value), _as_leaves(shardings[name])
        quantized = isinstance(value, NF4Weight)

        def abstract(leaf, sharding, per_layer: bool):
            shape = leaf.shape[1:] if per_layer else leaf.shape
            leaf_dtype = leaf.dtype if quantized else stored_dtype
            return jax.ShapeDtypeStruct(shape, leaf_dtype, sharding=_without_layer_axis(sharding) if per_layer
                                        else sharding)

        if per_expert(name, marker):
            experts = config.num_local_experts
            tree = {}
            for i in range(layers):
                for e in range(experts):
                    nest(expert_key(name, i, e), jax.ShapeDtypeStruct(
                        leaves.shape[2:], stored_dtype, sharding=_without_layer_axis(_without_layer_axis(target))),
                        tree)
            restored = weights.load(tree)
            slices = [lookup(restored, expert_key(name, i, e)) for i in range(layers) for e in range(experts)]
            result = _stack(slices, leaves.dtype, target, (layers, experts))
            del restored, slices
        elif name.startswith("layers."):
            tree: dict = {}
            for i in range(layers):
                nest(leaf_key(name, i), jax.tree.map(lambda l, s: abstract(l, s, True), leaves, target), tree)
            restored = weights.load(tree)
            slices = [lookup(restored, leaf_key(name, i)) for i in range(layers)]
            result = jax.tree.map(lambda leaf, s, *xs: _stack(xs, leaf.dtype, s), leaves, target, *slices)
            del restored, slices
        else:
            restored = weights.load(nest(leaf_key(name, None),
                                            jax.tree.map(lambda l, s: abstract(l, s, False), leaves, target)))
            result = jax.tree.map(lambda leaf, s, x: x if x.dtype == leaf.dtype else _cast(x, leaf.dtype, s),
                                  leaves, target, lookup(restored, leaf_key(name, None)))
        if quantized:
            result = value.replace(packed=result["packed"], absmax=result["absmax"])
        variable.set_value(result)
    if lora is not None:
        place = _placement(model, mesh)
        init_adapters(model, lora_seed)
        for path, variable in nnx.iter_graph(model):
            if isinstance(variable, LoRAParam):
                name = ".".join(str(p) for p in path)
                variable.set_value(place(name, np.asarray(variable.get_value())))
    return model


def _stack(slices, dtype, sharding, leading=None):
    def stack(*xs):
        stacked = jnp.stack(xs).astype(dtype)
        return stacked if leading is None else stacked.reshape(*leading, *stacked.shape[1:])

    return jax.jit(stack, out_shardings=sharding)(*slices)


def _cast(x, dtype, sharding):
    return jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)(x)



__all__ = ["abstract_model", "dequantize_layer", "layer_quantizer", "load", "nf4_templates", "storage_chunks"]
