"""Orbax model checkpoints: a whole model (not a training run) as Orbax arrays in our layout, written one
layer-tensor at a time and restored onto any mesh. `mixtral-jax convert hf-to-orbax` writes them;
`from_pretrained(dir, mesh=...)` reads them.

    OUT/config.json              the HF config (`MixtralConfig.to_hf()`), torch_dtype = the stored dtype
    OUT/orbax_model.json         the marker: {"format": "mixtral-jax-orbax-model", "version": 2,
                                 "dtype": stored dtype of the unquantised weights, "quantize": "none" | "nf4",
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
      Each array is one chunk, or with `--mesh` chunks of one device's shard on that mesh (`convert_hf`).
      With quantize nf4 every weight that `quantized.quantize_base` quantises (q/k/v/o_proj, gate, w1-w3) is
      stored as its two arrays, `.../q_proj/packed` (uint8) and `.../q_proj/absmax` (fp32), exactly
      `quantize_base(model)`'s arrays for that layer (so ~0.56 bytes per quantised parameter on disk); the NF4
      experts stay one key per layer-tensor ([E, ...] packed), quantised one expert at a time (the same bits).

Writing goes leaf by leaf (one layer-tensor, or one expert's matrix for w1-w3), each written with O_DIRECT
by `orbax_files.PyTreeWriter` while the next two are read and transposed on other threads, so the disk and
both cores stay busy and at most three leaves are held. Orbax's own partial saves went through the page
cache at ~3 ms of system time per MB and could not overlap within one process (README, Performance). The
whole directory is built under a temporary name and renamed when complete (output_dir.py).

Reading onto devices is orbax_load.py's (`from_pretrained` dispatches there). `OrbaxSource` reads single
layer-tensors onto the host, which the converters back to HF use. This module needs no JAX (only an NF4
checkpoint's quantisation and dequantisation import it), so the converters start fast (layout.py).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from mixtral_jax.config import MixtralConfig, read_json_object
from mixtral_jax.host_arrays import BufferRing
from mixtral_jax.layer_tensors import HFSource, extra_files, reuse_or_new
from mixtral_jax.layout import QUANTIZED, Item, layer_shapes, ordered_items
from mixtral_jax.orbax_files import PyTreeWriter, read_into
from mixtral_jax.output_dir import output_directory
from mixtral_jax.safetensors_io import CheckpointError

FORMAT = "mixtral-jax-orbax-model"
VERSION = 2
READ_VERSIONS = (1, 2)
EXPERTS = ("w1", "w2", "w3")
MARKER = "orbax_model.json"
WEIGHTS = "weights"
QUANTIZE = ("none", "nf4")


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


def leaf_key(param: str, layer: int | None) -> tuple[str, ...]:
    """Our dotted parameter name and layer -> the Orbax key path, e.g. ('layers', '007', 'self_attn', 'q_proj')."""
    parts = tuple(param.split("."))
    if parts[0] == "layers":
        return ("layers", f"{layer:03d}", *parts[1:])
    return parts


def is_quantized(param: str) -> bool:
    return param.startswith("layers.") and param.split(".")[-1] in QUANTIZED


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


# ------------------------------------------------------------------------------------------------ writing
READ_AHEAD = 2  # leaves read (and transposed) ahead of the one being written


def convert_hf(hf_dir: str, out: str, *, dtype: str | None = None, quantize: str = "none", mesh: str | None = None,
               overwrite: bool = False, show_progress: bool = False) -> dict:
    """Streams an HF directory (legacy or fused layout, sharded or not) into an Orbax model checkpoint at `out`.

    `dtype` None keeps the checkpoint's dtype. `mesh` (a spec, "fsdp=2,expert=4") stores each array in chunks
    of one device's shard on that mesh, as Orbax saves arrays sharded there: restoring onto it reads only
    each device's chunks (any other mesh still restores it). Returns a summary (bytes read and written)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quantize!r}")
    out = os.fspath(out)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    source = HFSource(hf_dir, dtype)
    config = source.config
    chunks = {}
    if mesh:  # the logical axes of every parameter are the Flax model's: JAX is imported for this
        from mixtral_jax.orbax_load import storage_chunks

        chunks = storage_chunks(config, quantize, mesh)
    stored = {"read_bytes": 0, "quantized_params": 0, "quantized_bytes": 0, "other_bytes": 0}
    with output_directory(out) as tmp, tqdm(total=source.total_bytes(), unit="B", unit_scale=True,
                                            desc=f"hf-to-orbax {os.path.basename(out)}",
                                            disable=not show_progress) as bar:
        writer = PyTreeWriter(os.path.join(tmp, WEIGHTS))
        for key, leaf, item, completes in _read_ahead(_tasks(source, quantize)):
            chunk = chunks.get(item[0])
            if isinstance(leaf, tuple):  # NF4
                leaf, count = leaf
                stored["quantized_params"] += count
                for name, array in leaf.items():
                    writer.write((*key, name), array, chunk and chunk[name])
                    stored["quantized_bytes"] += array.nbytes
            else:
                writer.write(key, leaf, chunk)
                stored["other_bytes"] += leaf.nbytes
            if completes:
                read = source.new_bytes(item)
                stored["read_bytes"] += read
                bar.update(read)
            del leaf
        writer.finalize()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"format": FORMAT, "version": VERSION, "dtype": config.param_dtype, "quantize": quantize,
                       "num_hidden_layers": config.num_hidden_layers, "weights": [WEIGHTS],
                       "source": os.path.abspath(hf_dir)}, f, indent=2)
        for name, path in source.extra_files().items():
            shutil.copyfile(path, os.path.join(tmp, name))
    return stored


def _tasks(source: HFSource, quantize: str) -> list[tuple[tuple[str, ...], Callable, Item, bool, tuple]]:
    """(Orbax key, reader of its leaf, the item it is (part of), whether it completes that item, (shape, dtype)
    of the buffer the reader fills), in the order the source holds them. A reader takes that buffer (or None:
    a new one)."""
    config = source.config
    marker = {"version": VERSION, "quantize": quantize}
    if quantize == "nf4":  # the one step of the conversion that needs JAX
        from mixtral_jax.orbax_load import layer_quantizer

        quantize_layer = layer_quantizer(config)

    def nf4(param, layer, out=None):  # the packed arrays and the parameter count
        array = source.read(param, layer, out)
        return quantize_layer(param, array), array.size

    def nf4_experts(param, layer, out=None):  # the same, read and quantised one expert's matrix at a time
        leaves = {}
        for e in range(experts):
            expert = source.read_part(param, layer, (e,), out)
            for name, array in quantize_layer(param, expert).items():
                leaves.setdefault(name, np.empty((experts, *array.shape), array.dtype))[e] = array
        return leaves, experts * expert.size

    experts = config.num_local_experts
    tasks = []
    for param, layer in source.items():
        shape, dtype = source.shapes[param]
        if per_expert(param, marker):
            tasks += [(expert_key(param, layer, e), functools.partial(source.read_part, param, layer, (e,)),
                       (param, layer), e == experts - 1, (shape[1:], dtype)) for e in range(experts)]
        elif quantize == "nf4" and is_expert(param):
            tasks.append((leaf_key(param, layer), functools.partial(nf4_experts, param, layer), (param, layer),
                          True, (shape[1:], dtype)))
        elif quantize == "nf4" and is_quantized(param):
            tasks.append((leaf_key(param, layer), functools.partial(nf4, param, layer), (param, layer),
                          True, (shape, dtype)))
        else:
            tasks.append((leaf_key(param, layer), functools.partial(source.read, param, layer), (param, layer),
                          True, (shape, dtype)))
    return tasks


def _read_ahead(tasks: list) -> Iterator[tuple[tuple[str, ...], object, Item, bool]]:
    """(key, leaf, item, completes) for each of `_tasks`' tasks in order, the next `READ_AHEAD` read on other threads
    while the caller writes one: the reads (file copies, transposes) and the O_DIRECT writes overlap, and at
    most READ_AHEAD + 1 leaves are held. Each read fills a buffer of a ring taken here, in order, when it is
    submitted, so a buffer comes back only after the leaf that last held it was written (fresh memory for
    every leaf cost the kernel as much as the copy into it). A failed read is raised in order."""
    ring = BufferRing(depth=READ_AHEAD + 1)
    with ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="read-ahead") as pool:

        def submit(task):
            _, read, _, _, (shape, dtype) = task
            return pool.submit(read, ring.take(shape, dtype))

        pending = collections.deque(submit(task) for task in tasks[:READ_AHEAD])
        try:
            for i, (key, _, item, completes, _) in enumerate(tasks):
                leaf = pending.popleft().result()
                if i + READ_AHEAD < len(tasks):
                    pending.append(submit(tasks[i + READ_AHEAD]))
                yield key, leaf, item, completes
                del leaf
        finally:
            for future in pending:
                future.cancel()


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
        if self.marker["quantize"] == "nf4":  # dequantising is the one step of reading that needs JAX
            from mixtral_jax.orbax_load import nf4_templates

            self.nf4 = nf4_templates(self.config)
        self._cached: tuple = (None, None)
        self._cache_lock = threading.Lock()  # reads may come from several threads (`write_pretrained`)

    def items(self) -> list[Item]:
        return ordered_items(self.config)

    def read(self, param: str, layer: int | None) -> np.ndarray:
        if layer is not None and per_expert(param, self.marker):
            return np.stack([self.read_part(param, layer, (e,)) for e in range(self.config.num_local_experts)])
        key = leaf_key(param, layer)
        if param in self.nf4:
            from mixtral_jax.orbax_load import dequantize_layer

            template = self.nf4[param]
            arrays = {name: np.empty(a.shape[1:], a.dtype) for name, a in (("packed", template.packed),
                                                                          ("absmax", template.absmax))}
            return dequantize_layer(template, lookup(self.weights.load(nest(key, arrays)), key))
        shape, dtype = self.shapes[param]
        return np.asarray(lookup(self.weights.load(nest(key, np.empty(shape, dtype))), key))

    def read_part(self, param: str, layer: int | None, inner: tuple, out: np.ndarray | None = None) -> np.ndarray:
        """`read(param, layer)[inner]`; an expert's matrix (inner (e,)) of an unquantised checkpoint is one key,
        read straight into `out` where it fits (layer_tensors)."""
        inner = tuple(inner)
        if layer is not None and len(inner) == 1 and per_expert(param, self.marker):
            shape, dtype = self.shapes[param]
            key = expert_key(param, layer, inner[0])
            target = reuse_or_new(out, shape[1:], dtype)
            return np.asarray(lookup(self.weights.load(nest(key, target)), key))
        with self._cache_lock:
            if self._cached[0] != (param, layer):  # a whole layer-tensor, read once for all its experts
                self._cached = (None, None)
                self._cached = ((param, layer), self.read(param, layer))
            return self._cached[1][inner]

    def extra_files(self) -> dict[str, str]:
        return extra_files(self.directory)


__all__ = ["FORMAT", "MARKER", "OrbaxSource", "Weights", "convert_hf", "expert_key", "flatten", "is_orbax_model",
           "leaf_key", "lookup", "nest", "per_expert", "read_config", "read_marker"]
