"""Where each weight lives in an Orbax model checkpoint: our dotted parameter name and layer (and expert)
-> the key path of its array, and the nested-dict helpers that build and read trees of such paths. No JAX.
The directory format around them is orbax_format.py's."""

from __future__ import annotations

from mixtral_jax.model.targets import LINEAR_WEIGHTS

EXPERTS = ("w1", "w2", "w3")


def leaf_key(param: str, layer: int | None) -> tuple[str, ...]:
    """Our dotted parameter name and layer -> the Orbax key path, e.g. ('layers', '007', 'self_attn', 'q_proj')."""
    parts = tuple(param.split("."))
    if parts[0] == "layers":
        return ("layers", f"{layer:03d}", *parts[1:])
    return parts


def is_quantized(param: str) -> bool:
    return param.startswith("layers.") and param.split(".")[-1] in LINEAR_WEIGHTS


def is_expert(param: str) -> bool:
    return param.startswith("layers.block_sparse_moe.") and param.split(".")[-1] in EXPERTS


def per_expert(param: str, marker: dict) -> bool:
    """Whether `param` is stored one key per expert (unquantised w1-w3)."""
    return marker.get("quantize") == "none" and is_expert(param)


def expert_key(param: str, layer: int, expert: int) -> tuple[str, ...]:
    return (*leaf_key(param, layer), f"{expert:03d}")


def nest(keys: tuple[str, ...], value, tree: dict | None = None) -> dict:
    """`tree` (or a new dict) with `value` at the key path `keys`."""
    tree = {} if tree is None else tree
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return tree


def lookup(tree: dict, keys: tuple[str, ...]):
    """The value at the key path `keys` of a nested dict."""
    for key in keys:
        tree = tree[key]
    return tree


def flatten(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """A nested dict's leaves by key path."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, (*prefix, key)))
    return flat


__all__ = ["EXPERTS", "expert_key", "flatten", "is_expert", "is_quantized", "leaf_key", "lookup", "nest", "per_expert"]
