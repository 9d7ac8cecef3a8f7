"""Where a loaded model's weights go: our dotted names for its base weights, the function that places one
host array (on the first device, or with its sharding on a mesh), and fresh adapters placed like the base.
Every loader (HF directories, Orbax model checkpoints) shares these, so a model loads the same whichever
format held it."""

from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model.lora import LoRAParam, init_adapters


def named_params(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    """(dotted name, variable) of every base weight (adapters excluded), e.g. "layers.self_attn.q_proj"."""
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and not isinstance(variable, LoRAParam):
            yield ".".join(str(p) for p in path), variable


def placement(model: nnx.Module, mesh=None) -> Callable[[str, np.ndarray], jax.Array]:
    """(dotted name, host array) -> the array on the default device, or sharded on `mesh` by the rules."""
    if mesh is None:
        return lambda name, array: jnp.asarray(array)
    from mixtral_jax.parallel import (
        sharding,  # the mesh machinery is needed only when a mesh is given
    )

    return sharding.param_placer(model, mesh)


def add_fresh_adapters(model: nnx.Module, mesh, lora_seed: int) -> None:
    """Initialises the model's adapters (A from `lora_seed`, B zero) and places each one like the base."""
    place = placement(model, mesh)
    init_adapters(model, lora_seed)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, LoRAParam):
            variable.set_value(place(".".join(str(p) for p in path), np.asarray(variable.get_value())))


__all__ = ["add_fresh_adapters", "named_params", "placement"]
