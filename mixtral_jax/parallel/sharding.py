"""Device meshes and the one table that maps the model's logical axis names to mesh axes.

The mesh has four named axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and
optimizer state sharded, gathered when used), `expert` (each device holds E / expert of the experts; tokens
travel to them) and `tensor` (heads and the MLP width split across devices). Parameters carry logical axis
names (see model/transformer.py); activations are constrained with logical names too, through `constrain`, which is a
no-op unless a mesh is active (`use_mesh`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from importlib import resources
from typing import Mapping, Sequence

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from mixtral_jax.config import MixtralConfig
from mixtral_jax.quantization.nf4_weight import NF4Weight

MESH_AXES = ("data", "fsdp", "expert", "tensor")


class MeshError(ValueError):
    """A mesh that does not fit the devices or the model; raised before anything is compiled."""


def default_rules() -> dict[str, tuple[str, ...]]:
    """The logical-axis table shipped in `presets/sharding_rules.yaml`."""
    text = (resources.files("mixtral_jax") / "presets" / "sharding_rules.yaml").read_text()
    return parse_rules(yaml.safe_load(text), "sharding_rules.yaml")


def parse_rules(raw: Mapping, source: str = "rules") -> dict[str, tuple[str, ...]]:
    rules = {}
    for name, axes in raw.items():
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            if axis not in MESH_AXES:
                raise MeshError(f"{source}: logical axis '{name}' maps to unknown mesh axis '{axis}' "
                                f"(mesh axes: {', '.join(MESH_AXES)})")
        rules[name] = axes
    return rules


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """'data=2,fsdp=1,expert=4,tensor=1' -> sizes of all four axes; unnamed axes are 1, one -1 fills the rest."""
    if isinstance(spec, str):
        sizes = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in MESH_AXES:
                raise MeshError(f"mesh spec '{spec}': '{part}' is not axis=size with axis in {', '.join(MESH_AXES)}")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise MeshError(f"mesh spec '{spec}': size of '{name}' is not an integer") from None
    else:
        sizes = dict(spec)
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
        raise MeshError(f"mesh spec {spec!r}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise MeshError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh spec {spec!r}: {' x '.join(str(s) for s in sizes.values())} = "
                        f"{math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def mesh_device_count(spec: str, devices: int | None = None) -> int:
    """The devices a mesh spec needs: its product, or `devices` (checked against the spec)."""
    if devices is not None:
        if devices <= 0:
            raise MeshError(f"--devices must be positive, got {devices}")
        parse_mesh_spec(spec, devices)
        return devices
    names = [part.partition("=")[0].strip() for part in spec.split(",") if part.strip()]
    for name in names:
        if names.count(name) > 1:
            raise MeshError(f"mesh spec '{spec}' names axis '{name}' twice")
    try:
        sizes = [int(part.partition("=")[2]) for part in spec.split(",") if part.strip()]
    except ValueError:
        sizes = [1]
    if -1 in sizes:
        raise MeshError(f"mesh spec '{spec}' has a -1 axis: give every axis its size (or, to plan, the device count "
                        f"with --devices)")
    count = math.prod(sizes) if sizes and all(s > 0 for s in sizes) else 1
    parse_mesh_spec(spec, count)  # the spec's own errors (unknown axis, bad size), in its words
    return count


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              config: MixtralConfig | None = None) -> Mesh:
    """The mesh for `spec` over `devices` (default: all); with `config`, also checks the model fits it."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    mesh = Mesh(np.array(devices).reshape(tuple(sizes[a] for a in MESH_AXES)), MESH_AXES)
    if config is not None:
        check_mesh_fits(mesh, config)
    return mesh


def check_mesh_fits(mesh: Mesh, config: MixtralConfig) -> None:
    experts = mesh.shape["expert"]
    if config.num_local_experts % experts:
        raise MeshError(f"mesh axis 'expert' ({experts}) must divide num_local_experts "
                        f"({config.num_local_experts})")


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, tuple[str, ...]]) -> PartitionSpec:
    """Each dimension gets the mesh axes its logical name maps to, minus axes of size 1, axes an earlier
    dimension already took, and trailing axes whose product would not divide the dimension (replicated)."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        axes = [a for a in rules.get(name, ()) if name is not None and mesh.shape[a] > 1 and a not in used]
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else axes[0] if axes else None)
    return PartitionSpec(*spec)


# ------------------------------------------------------------------------------------------------ parameters
def param_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> nnx.State:
    """The NamedSharding of every parameter, from its `logical_axes` metadata (a state like nnx.state(model))."""
    rules = default_rules() if rules is None else rules

    def sharding_of(variable):
        value = variable.get_value()
        if isinstance(value, NF4Weight):  # packed codes and block scales shard by the weight's own logical axes,
            # double quantisation's per-tensor scales and offsets (a few per 256 blocks) are replicated
            by_axes = jax.tree.map(
                lambda leaf: NamedSharding(mesh, logical_to_spec(value.axes, leaf.shape, mesh, rules)), value)
            small = {name: NamedSharding(mesh, PartitionSpec()) for name in ("absmax_scale", "offset")
                     if getattr(value, name) is not None}
            return variable.replace(by_axes.replace(**small))
        axes = variable.get_metadata().get("logical_axes", (None,) * len(value.shape))
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))

    return jax.tree.map(sharding_of, nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None) -> nnx.Module:
    """Moves every parameter onto the mesh with its sharding (in place; returns the model). Each process
    supplies its own devices' slices, so this works on a multi-host mesh too (same values on every host)."""
    place = param_placer(model, mesh, rules)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Variable):
            name = ".".join(str(p) for p in path)
            variable.set_value(place(name, jax.tree.map(np.asarray, jax.device_get(variable.get_value()))))
    return model


def shardings_by_name(model: nnx.Module, mesh: Mesh | AbstractMesh, rules: Mapping | None = None) -> dict:
    """`param_shardings` by dotted parameter path ("layers.self_attn.q_proj"); an NF4 weight's is an NF4Weight
    of shardings. On an AbstractMesh (sizes only, no devices) its `shard_shape`s are the devices' shards."""
    return {".".join(str(p) for p in path): s.get_value()
            for path, s in nnx.to_flat_state(param_shardings(model, mesh, rules))}


def param_placer(model: nnx.Module, mesh: Mesh, rules: Mapping | None = None):
    """For streaming loads: (parameter path, host array) -> a sharded array built shard by shard, so each
    device receives only its slice and no host assembles more than the one parameter being read."""
    shardings = shardings_by_name(model, mesh, rules)

    def place(name: str, value):  # an array, or a pytree of arrays (an NF4 weight)
        return jax.tree.map(lambda array, sharding: jax.make_array_from_callback(
            array.shape, sharding, lambda index: array[index]), value, shardings[name])

    return place


# ------------------------------------------------------------------------------------------------ activations
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("mixtral_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping | None = None):
    """Inside, `constrain` pins activations to the mesh by their logical names."""
    token = _ACTIVE.set((mesh, default_rules() if rules is None else rules))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Mapping] | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, rules)))


def constrain_as_used(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`constrain` for a parameter where a layer uses it: whole over `fsdp` (parameters are stored split over
    fsdp and gathered where they are used, as XLA does for FSDP), split over the other axes as stored. For a
    weight whose gather should happen on a smaller form of it than the one the layer multiplies by."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    used = {name: tuple(axis for axis in axes if axis != "fsdp") for name, axes in rules.items()}
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, x.shape, mesh, used)))


def named_sharding(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping | None = None) -> NamedSharding:
    rules = default_rules() if rules is None else rules
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


__all__ = ["MESH_AXES", "MeshError", "active_mesh", "check_mesh_fits", "constrain", "constrain_as_used",
           "default_rules", "logical_to_spec", "make_mesh", "mesh_device_count", "named_sharding", "param_placer",
           "param_shardings", "parse_mesh_spec", "shard_model", "shardings_by_name", "use_mesh"]
