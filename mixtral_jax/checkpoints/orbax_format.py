"""Orbax model checkpoints: a whole model (not a training run) as Orbax arrays in our layout, written one
layer-tensor at a time and restored onto any mesh. `mixtral-jax convert hf-to-orbax` writes them;
`from_pretrained(dir, mesh=...)` reads them.

    OUT/config.json              the HF config (`MixtralConfig.to_hf()`), torch_dtype = the stored dtype
    OUT/orbax_model.json         the marker: {"format": "mixtral-jax-orbax-model", "version": 3,
                                 "dtype": stored dtype of the unquantised weights,
                                 "quantize": "none" | "nf4" | "nf4-plain",
                                 "num_hidden_layers": L, "weights": ["weights"]}
    OUT/generation_config.json   and the tokenizer files, copied from the source when it has them
    OUT/weights                  an Orbax PyTree checkpoint (zarr3, one directory per key, written by
                                 orbax_files.py), the weight part. The marker lists the parts: each key below
                                 is in exactly one of them (which one is read from the parts' metadata), so
                                 the two OCDBT parts `weights/0`, `weights/1` that earlier versions wrote are
                                 still read, and so is version 1's single part named as a string,
                                 `"weights": "weights"`.
        embed_tokens                              [V, D]
        norm/weight                               [D]
        lm_head                                   [D, V]   (absent with tied embeddings)
        layers/007/input_layernorm/weight         [D]      layer 7 of the stacked parameter, i.e. param[7]
        layers/007/self_attn/q_proj               [D, H, hd]   (k_proj, v_proj [D, KV, hd]; o_proj [H, hd, D])
        layers/007/block_sparse_moe/gate          [D, E]
        layers/007/block_sparse_moe/w1/003        [D, F]   expert 3 of w1 (w3 the same; w2 [F, D]): one key per
                                                           expert, so no step holds a whole [E, D, F] (940 MB at
                                                           8x7B's widths).
      Arrays are stored uncompressed (zarr3 without zstd: the weights barely compress, and zstd on a few cores
      was the converter's bottleneck).
      Each array is one chunk, or with `--mesh` chunks of one device's shard on that mesh (hf_to_orbax.convert_hf).
      With quantize nf4 every weight that `nf4_base.quantize_base` quantises (q/k/v/o_proj, gate, w1-w3) is
      stored as the arrays of its NF4Weight, exactly `quantize_base(model)`'s for that layer: double-quantised
      (bitsandbytes' compress_statistics, ~0.516 bytes per quantised parameter) `.../q_proj/packed` (uint8),
      `.../q_proj/absmax_q` (uint8, one per 64 values), `.../q_proj/absmax_scale` (fp32, one per 256 blocks)
      and `.../q_proj/offset` (fp32 [1]); with quantize nf4-plain `.../packed` and `.../absmax` (fp32,
      ~0.56 bytes per parameter). The NF4 experts stay one key per layer-tensor ([E, ...] packed; offset
      [E, 1]: each expert is its own bitsandbytes tensor), quantised one expert at a time (the same bits).
      Versions 1 and 2 knew only plain NF4 and called it "nf4": their markers read as "nf4-plain".

Written by hf_to_orbax.py, restored onto devices by orbax_load.py; `OrbaxSource` here reads single
layer-tensors onto the host for the converters back to HF. This module imports no JAX (an NF4 checkpoint's
dequantisation imports nf4_layers when it is read), so the converters start fast.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from mixtral_jax.checkpoints.name_map import Item, layer_shapes, ordered_items
from mixtral_jax.checkpoints.orbax_files import read_into
from mixtral_jax.checkpoints.orbax_keys import (
    expert_key,
    flatten,
    leaf_key,
    lookup,
    nest,
    per_expert,
)
from mixtral_jax.checkpoints.sources import extra_files, reuse_or_new
from mixtral_jax.config import MixtralConfig, read_json_object
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.buffers import OneEntryCache

FORMAT = "mixtral-jax-orbax-model"
VERSION = 3  # 3: quantize "nf4" is double-quantised NF4, "nf4-plain" the plain NF4 that 1 and 2 called "nf4"
READ_VERSIONS = (1, 2, 3)
MARKER = "orbax_model.json"
WEIGHTS = "weights"
QUANTIZE = ("none", "nf4", "nf4-plain")  # as the model.quantize setting: nf4 with double quantisation, or without


# ------------------------------------------------------------------------------------------------ layout
def is_orbax_model(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MARKER))


def read_marker(directory: str) -> dict:
    path = os.path.join(directory, MARKER)
    marker = read_json_object(path, CheckpointError)
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{path}: field 'format' is {marker.get('format')!r}, expected {FORMAT!r}")
    if marker.get("version") not in READ_VERSIONS:
        raise CheckpointError(f"{path}: field 'version' is {marker.get('version')!r}; this version reads "
                              f"{', '.join(map(str, READ_VERSIONS))}")
    if marker.get("quantize") not in QUANTIZE:
        raise CheckpointError(f"{path}: field 'quantize' is {marker.get('quantize')!r} (known: {', '.join(QUANTIZE)})")
    if marker["version"] < 3 and marker["quantize"] == "nf4":  # stored before double quantisation: plain NF4
        marker = {**marker, "quantize": "nf4-plain"}
    parts = weight_parts(marker)
    if not parts or not all(isinstance(part, str) for part in parts):
        raise CheckpointError(f"{path}: field 'weights' is {marker.get('weights')!r}, expected a list of "
                              f"directories")
    for part in parts:
        if not os.path.isdir(os.path.join(directory, part)):
            raise CheckpointError(f"{path}: field 'weights' names '{part}', which is missing")
    return marker


def weight_parts(marker: dict) -> list[str]:
    """The Orbax checkpoints that hold the arrays, relative to the model directory (version 1: one)."""
    parts = marker.get("weights", WEIGHTS)
    return [parts] if isinstance(parts, str) else list(parts) if isinstance(parts, list) else []


def _orbax():
    import orbax.checkpoint.experimental.v1 as ocp

    if not any(isinstance(f, _NoZarr2Warning) for f in logging.getLogger("absl").filters):
        logging.getLogger("absl").addFilter(_NoZarr2Warning())
    return ocp


class _NoZarr2Warning(logging.Filter):
    """Drops Orbax's "TensorStore data files not found ... malformed checkpoint" warning, which it logs on
    every load of a checkpoint without OCDBT, ours (orbax_files.py) or its own: it looks for zarr2's
    `.zarray` files only, and ours are zarr3."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorStore data files not found" not in record.getMessage()


def _load(weights: str, tree: dict) -> dict:
    """Restores just the leaves of `tree` (abstract: ShapeDtypeStruct with sharding, or numpy arrays)."""
    ocp = _orbax()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    try:
        with ctx:
            return ocp.load(weights, tree)
    except (ValueError, KeyError, FileNotFoundError) as err:
        first = "/".join(next(iter(flatten(tree))))
        raise CheckpointError(f"{weights}: cannot restore {first} and the others asked "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


class Weights:
    """The arrays of an Orbax model checkpoint, spread over its weight parts (each key in one of them)."""

    def __init__(self, directory: str, marker: dict):
        self.directory = directory
        self.parts = [os.path.abspath(os.path.join(directory, part)) for part in weight_parts(marker)]
        self._owners: dict | None = None

    def owners(self) -> dict[tuple[str, ...], int]:
        """Key path -> index of the part that holds it, from each part's Orbax metadata (read once)."""
        if self._owners is None:
            ocp = _orbax()
            self._owners = {keys: i for i, part in enumerate(self.parts)
                            for keys in flatten(ocp.metadata(part).metadata)}
        return self._owners

    def load(self, tree: dict) -> dict:
        """`_load` over the parts: each part restores the leaves of `tree` it holds. Host leaves (numpy
        arrays, as `OrbaxSource` asks) stored as orbax_files writes them are read straight into those arrays,
        without Orbax."""
        restored: dict = {}
        split: dict = {}
        for keys, leaf in flatten(tree).items():
            part = self._part_of(keys)
            if isinstance(leaf, np.ndarray) and read_into(self.parts[part], keys, leaf):
                nest(keys, leaf, restored)
            else:
                nest(keys, leaf, split.setdefault(part, {}))
        for i, subtree in split.items():
            for keys, leaf in flatten(_load(self.parts[i], subtree)).items():
                nest(keys, leaf, restored)
        return restored

    def _part_of(self, keys: tuple[str, ...]) -> int:
        if len(self.parts) == 1:
            return 0
        owners = self.owners()
        if keys not in owners:
            raise CheckpointError(f"{self.directory}: no weights part holds {'/'.join(keys)}")
        return owners[keys]


# ------------------------------------------------------------------------------------------------ reading
def read_config(directory: str, dtype: str | None = None, **implementation) -> tuple[MixtralConfig, dict]:
    marker = read_marker(directory)
    dtype = dtype or marker["dtype"]
    config = MixtralConfig.from_hf(directory, **{"dtype": dtype, "param_dtype": dtype, **implementation})
    if config.num_hidden_layers != marker.get("num_hidden_layers"):
        raise CheckpointError(f"{os.path.join(directory, MARKER)}: field 'num_hidden_layers' is "
                              f"{marker.get('num_hidden_layers')!r} but config.json says {config.num_hidden_layers}")
    return config, marker


class OrbaxSource:
    """One layer-tensor at a time from an Orbax model checkpoint, onto the host (an NF4 weight dequantised
    to the stored dtype), for the converters back to HF and `verify`; safe to read from several threads."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.config, self.marker = read_config(self.directory)
        self.weights = Weights(self.directory, self.marker)
        self.shapes = layer_shapes(self.config)
        self.nf4 = {}  # param -> its abstract NF4 weight, stacked over layers
        if self.marker["quantize"] != "none":  # dequantising is the one step of reading that needs JAX
            from mixtral_jax.checkpoints.nf4_layers import nf4_templates

            self.nf4 = nf4_templates(self.config, self.marker["quantize"])
        self._layer_tensor = OneEntryCache(self.read)  # reads may come from several threads

    def items(self) -> list[Item]:
        return ordered_items(self.config)

    def read(self, param: str, layer: int | None) -> np.ndarray:
        if layer is not None and per_expert(param, self.marker):
            return np.stack([self.read_part(param, layer, (e,)) for e in range(self.config.num_local_experts)])
        key = leaf_key(param, layer)
        if param in self.nf4:
            from mixtral_jax.checkpoints.nf4_layers import as_leaves, dequantize_layer

            template = self.nf4[param]
            arrays = {name: np.empty(a.shape[1:], a.dtype) for name, a in as_leaves(template).items()}
            return dequantize_layer(template, lookup(self.weights.load(nest(key, arrays)), key))
        shape, dtype = self.shapes[param]
        return np.asarray(lookup(self.weights.load(nest(key, np.empty(shape, dtype))), key))

    def read_part(self, param: str, layer: int | None, inner: tuple, out: np.ndarray | None = None) -> np.ndarray:
        """`read(param, layer)[inner]`; an expert's matrix (inner (e,)) of an unquantised checkpoint is one key,
        read straight into `out` where it fits (sources.py)."""
        inner = tuple(inner)
        if layer is not None and len(inner) == 1 and per_expert(param, self.marker):
            shape, dtype = self.shapes[param]
            key = expert_key(param, layer, inner[0])
            target = reuse_or_new(out, shape[1:], dtype)
            return np.asarray(lookup(self.weights.load(nest(key, target)), key))
        return self._layer_tensor.get(param, layer)[inner]  # a whole layer-tensor, read once for its experts

    def extra_files(self) -> dict[str, str]:
        return extra_files(self.directory)


__all__ = ["FORMAT", "MARKER", "OrbaxSource", "Weights", "is_orbax_model", "read_config", "read_marker"]
