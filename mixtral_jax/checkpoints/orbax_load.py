"""Restoring an Orbax model checkpoint (orbax_format.py) onto devices. Each of our stacked parameters is
restored from its layer slices (or, for unquantised experts, one matrix per expert), each slice straight onto
its target sharding without the stacked axes (any mesh), then stacked on the devices: peak memory is the
model plus one parameter. The host-side reader is orbax_format.OrbaxSource; this module is the JAX side.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from tqdm.auto import tqdm

from mixtral_jax.checkpoints.nf4_layers import abstract_model, as_leaves
from mixtral_jax.checkpoints.orbax_format import Weights, read_config
from mixtral_jax.checkpoints.orbax_keys import (
    expert_key,
    leaf_key,
    lookup,
    nest,
    per_expert,
)
from mixtral_jax.checkpoints.placement import add_fresh_adapters, named_params
from mixtral_jax.config import canonical_dtype
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.quantization.nf4_weight import NF4Weight


def load(directory: str | os.PathLike, dtype: Any = None, *, mesh=None, lora: LoraConfig | None = None,
         lora_seed: int = 0, show_progress: bool = False, **implementation) -> Mixtral:
    """The model of an Orbax model checkpoint (`from_pretrained` dispatches here), each parameter restored
    with its sharding on `mesh` (default: the first device). `dtype` casts the unquantised weights."""
    directory = os.fspath(directory)
    if dtype is not None:
        dtype = canonical_dtype(dtype, "load: argument 'dtype'")
    config, marker = read_config(directory, dtype, **implementation)
    model = abstract_model(config, lora, marker["quantize"])
    restore = _Restorer(Weights(directory, marker), marker, config.num_hidden_layers, config.num_local_experts)
    shardings = _target_shardings(model, mesh)
    for name, variable in tqdm(list(named_params(model)), desc=f"loading {os.path.basename(directory)}",
                               disable=not show_progress):
        value = variable.get_value()
        result = restore(name, as_leaves(value), as_leaves(shardings[name]), isinstance(value, NF4Weight))
        if isinstance(value, NF4Weight):
            result = value.replace(**result)  # its stored arrays (nf4_layers.as_leaves)
        variable.set_value(result)
    if lora is not None:
        add_fresh_adapters(model, mesh, lora_seed)
    return model


def _target_shardings(model: Mixtral, mesh) -> dict:
    """Each parameter's sharding (a tree of them for an NF4 weight): by the rules on `mesh`, else the first
    device."""
    if mesh is not None:
        from mixtral_jax.parallel.sharding import shardings_by_name

        return shardings_by_name(model, mesh)
    device = SingleDeviceSharding(jax.devices()[0])
    return {name: jax.tree.map(lambda _: device, as_leaves(v.get_value())) for name, v in named_params(model)}


class _Restorer:
    """One parameter at a time from the checkpoint's slices, in the layout it was stored in."""

    def __init__(self, weights: Weights, marker: dict, layers: int, experts: int):
        self.weights, self.marker, self.layers, self.experts = weights, marker, layers, experts
        self.stored_dtype = jnp.dtype(marker["dtype"])

    def __call__(self, name: str, leaves, target, quantized: bool):
        """`leaves`: the abstract parameter (an array, or an NF4 weight's dict of arrays); `target`: its shardings."""
        if per_expert(name, self.marker):
            return self._per_expert(name, leaves, target)
        if name.startswith("layers."):
            return self._per_layer(name, leaves, target, quantized)
        return self._whole(name, leaves, target, quantized)

    def _abstract(self, leaf, sharding, quantized: bool, stacked_axes: int):
        return jax.ShapeDtypeStruct(leaf.shape[stacked_axes:], leaf.dtype if quantized else self.stored_dtype,
                                    sharding=_without_leading_axes(sharding, stacked_axes))

    def _per_expert(self, name: str, leaf, target):
        keys = [expert_key(name, i, e) for i in range(self.layers) for e in range(self.experts)]
        tree: dict = {}
        for key in keys:
            nest(key, self._abstract(leaf, target, False, 2), tree)
        restored = self.weights.load(tree)
        return _stack([lookup(restored, key) for key in keys], leaf.dtype, target, (self.layers, self.experts))

    def _per_layer(self, name: str, leaves, target, quantized: bool):
        keys = [leaf_key(name, i) for i in range(self.layers)]
        tree: dict = {}
        for key in keys:
            nest(key, jax.tree.map(lambda leaf, s: self._abstract(leaf, s, quantized, 1), leaves, target), tree)
        restored = self.weights.load(tree)
        slices = [lookup(restored, key) for key in keys]
        return jax.tree.map(lambda leaf, s, *xs: _stack(xs, leaf.dtype, s), leaves, target, *slices)

    def _whole(self, name: str, leaves, target, quantized: bool):
        key = leaf_key(name, None)
        abstract = jax.tree.map(lambda leaf, s: self._abstract(leaf, s, quantized, 0), leaves, target)
        restored = lookup(self.weights.load(nest(key, abstract)), key)
        return jax.tree.map(lambda leaf, s, x: x if x.dtype == leaf.dtype else _cast(x, leaf.dtype, s),
                            leaves, target, restored)


def _without_leading_axes(sharding, count: int):
    if isinstance(sharding, NamedSharding) and count:
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[count:]))
    return sharding


def _stack(slices, dtype, sharding, leading=None):
    def stack(*xs):
        stacked = jnp.stack(xs).astype(dtype)
        return stacked if leading is None else stacked.reshape(*leading, *stacked.shape[1:])

    return jax.jit(stack, out_shardings=sharding)(*slices)


def _cast(x, dtype, sharding):
    return jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)(x)


__all__ = ["load"]
