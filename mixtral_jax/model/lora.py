"""Low-rank adapters (LoRA) on any of q_proj, k_proj, v_proj, o_proj, w1, w2, w3 and gate (the router).

An adapted weight W computes `x W + (alpha / r) * (x A) B`, A initialised as peft does (kaiming-uniform with
a = sqrt 5, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B zero, so a fresh adapter leaves the model unchanged.
Expert weights get one (A, B) pair per expert, stacked [E, ...] like the experts and computed by the same
grouped product. Adapter parameters are `LoRAParam`s, so a train step can select them alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.model.targets import LINEAR_WEIGHTS
from mixtral_jax.settings import setting, setting_list


class LoRAParam(nnx.Param):
    """An adapter weight (trainable while the base is frozen)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapters' hyperparameters, declared once: the train config's `lora` section extends this class, and
    a run's manifest records these fields, so each has its settings help (`mixtral-jax train --keys`)."""

    rank: int = setting(64, "adapter rank r", min=1)
    alpha: float = setting(128.0, "scale alpha (the update is alpha / r * x A B)", min=0)
    # On the adapter's input, when the forward is given a dropout key (training).
    dropout: float = setting(0.05, "dropout on the adapters' input", min=0, max=0.99)
    targets: tuple[Literal[LINEAR_WEIGHTS], ...] = setting_list(
        LINEAR_WEIGHTS, f"adapted weights (any of {' '.join(LINEAR_WEIGHTS)})")
    # Not a field: adapters (and so their optimizer state) always stay fp32 under a bf16 base, so it is neither a
    # setting nor recorded in a run's manifest.
    dtype: ClassVar[str] = "float32"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora: field 'rank' must be a positive integer, got {self.rank!r}")
        unknown = sorted(set(self.targets) - set(LINEAR_WEIGHTS))
        if unknown:
            raise ValueError(f"lora: field 'targets' has unknown module '{unknown[0]}' "
                             f"(known: {', '.join(LINEAR_WEIGHTS)})")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Adapter(NamedTuple):
    a: jax.Array      # [*leading, *in_dims, r]
    b: jax.Array      # [*leading, r, *out_dims]
    scale: float
    dropout: float = 0.0
    key: jax.Array | None = None  # dropout on the adapter's input (training only), as peft's lora_dropout

    def input(self, x: jax.Array) -> jax.Array:
        if self.key is None or self.dropout == 0:
            return x
        keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)


def make_pair(key: jax.Array, leading: tuple[int, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
              rank: int, dtype, leading_axes: tuple, in_axes: tuple, out_axes: tuple) -> tuple[LoRAParam, LoRAParam]:
    """(A, B) for a weight [*leading, *in_shape, *out_shape]: A [*leading, *in_shape, r], B [*leading, r, *out]."""
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(key, (*leading, *in_shape, rank), dtype, -bound, bound)
    b = jnp.zeros((*leading, rank, *out_shape), dtype)
    return (LoRAParam(a, logical_axes=(*leading_axes, *in_axes, "lora_rank")),
            LoRAParam(b, logical_axes=(*leading_axes, "lora_rank", *out_axes)))


def project(x: jax.Array, weight: jax.Array, adapter: Adapter | None, contracted: int) -> jax.Array:
    """x contracted with the first `contracted` dims of weight, plus the adapter's low-rank update."""
    out = jnp.tensordot(x, weight, axes=contracted)
    if adapter is None:
        return out
    low = jnp.tensordot(adapter.input(x), adapter.a.astype(x.dtype), axes=contracted)
    return out + adapter.scale * jnp.tensordot(low, adapter.b.astype(x.dtype), axes=1)


def merged(weight: jax.Array, adapter: Adapter, contracted: int) -> jax.Array:
    """W + (alpha / r) * A B computed in fp32, in W's dtype (what a merged export holds)."""
    a, b = adapter.a.astype(jnp.float32), adapter.b.astype(jnp.float32)
    lead = a.ndim - contracted - 1
    in_letters, out_letters = "abcdefgh"[:contracted], "ijklmnop"[: b.ndim - lead - 1]
    lead_letters = "stuvw"[:lead]
    delta = jnp.einsum(f"{lead_letters}{in_letters}r,{lead_letters}r{out_letters}->{lead_letters}{in_letters}{out_letters}",
                       a, b)
    return (weight.astype(jnp.float32) + adapter.scale * delta).astype(weight.dtype)


def attach(module: nnx.Module, name: str, weight_shape: tuple[int, ...], contracted: int, axes: tuple,
           config: "LoraConfig | None", rngs: nnx.Rngs, leading: int = 0) -> None:
    """Gives `module` the adapter `{name}_lora_a/_b` for its weight `name` when `config` targets it.

    `leading` dims of the weight (the experts) get their own pairs; the next `contracted` dims are the
    input, the rest the output.
    """
    if config is None or name not in config.targets:
        return
    lead, rest = weight_shape[:leading], weight_shape[leading:]
    a, b = make_pair(rngs.params(), lead, rest[:contracted], rest[contracted:], config.rank,
                     jnp.dtype(config.dtype), axes[:leading], axes[leading:leading + contracted],
                     axes[leading + contracted:])
    setattr(module, f"{name}_lora_a", a)
    setattr(module, f"{name}_lora_b", b)


def adapter_of(module: nnx.Module, name: str, dtype=None, dropout_key: jax.Array | None = None) -> Adapter | None:
    """The adapter of weight `name`, or None; with `dropout_key`, its input is dropped out at the config's rate."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return None
    b = getattr(module, f"{name}_lora_b")
    dtype = dtype or a[...].dtype
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, LINEAR_WEIGHTS.index(name))
    return Adapter(a[...].astype(dtype), b[...].astype(dtype), module.lora.scale, module.lora.dropout, key)


def init_adapters(model: nnx.Module, seed: int = 0) -> None:
    """Fresh adapters for every LoRAParam of `model` (e.g. one built abstractly around loaded weights):
    A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in the weight's input size, B = 0."""
    key = jax.random.key(seed)
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, LoRAParam):
            continue
        value = variable.get_value()
        if str(path[-1]).endswith("_lora_b"):
            variable.set_value(jnp.zeros(value.shape, value.dtype))
            continue
        axes = variable.get_metadata()["logical_axes"]
        fan_in = math.prod(n for n, axis in zip(value.shape, axes) if axis not in ("layers", "experts", "lora_rank"))
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(fan_in)
        variable.set_value(jax.random.uniform(sub, value.shape, value.dtype, -bound, bound))


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its weight (W + alpha / r * A B in fp32, in W's dtype; an NF4 weight is
    dequantised first) and removes the adapters, in place: the result is a plain model (a merged export,
    or the base of a next stage)."""
    from mixtral_jax.quantization.nf4_weight import NF4Weight, dequantize_weight

    for _, module in list(nnx.iter_graph(model)):
        config = getattr(module, "lora", None)
        if not isinstance(module, nnx.Module) or config is None:
            continue
        for name in LINEAR_WEIGHTS:
            adapter = adapter_of(module, name, jnp.float32)
            if adapter is None:
                continue
            variable = getattr(module, name)
            weight = variable.get_value()
            if isinstance(weight, NF4Weight):
                weight = dequantize_weight(weight)
            variable.set_value(merged(weight, adapter, 2 if name == "o_proj" else 1))
            delattr(module, f"{name}_lora_a")
            delattr(module, f"{name}_lora_b")
        module.lora = None
    return model
