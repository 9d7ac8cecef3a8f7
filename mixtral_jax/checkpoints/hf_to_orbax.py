"""`convert hf-to-orbax`: an HF directory streamed into an Orbax model checkpoint (orbax_format.py), leaf
by leaf (one layer-tensor, or one expert's matrix for w1-w3), each written with O_DIRECT by
`orbax_files.PyTreeWriter` while the next two are read and transposed on other threads (io/read_ahead.py).
With `quantize="nf4"` (double-quantised) or "nf4-plain" each linear weight is stored as `quantize_base`'s NF4
arrays, quantised one layer (or one expert) at a time: the one step that imports JAX. The directory is built
under a temporary name and renamed when complete."""

from __future__ import annotations

import functools
import json
import os
import shutil
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from mixtral_jax.checkpoints.name_map import Item
from mixtral_jax.checkpoints.orbax_files import PyTreeWriter
from mixtral_jax.checkpoints.orbax_format import (
    FORMAT,
    MARKER,
    QUANTIZE,
    VERSION,
    WEIGHTS,
)
from mixtral_jax.checkpoints.orbax_keys import (
    expert_key,
    is_expert,
    is_quantized,
    leaf_key,
    per_expert,
)
from mixtral_jax.checkpoints.sources import HFSource
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.output_dir import output_directory
from mixtral_jax.io.read_ahead import read_ahead

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
        from mixtral_jax.checkpoints.nf4_layers import storage_chunks

        chunks = storage_chunks(config, quantize, mesh)
    stored = {"read_bytes": 0, "quantized_params": 0, "quantized_bytes": 0, "other_bytes": 0}
    with output_directory(out) as tmp, tqdm(total=source.total_bytes(), unit="B", unit_scale=True,
                                            desc=f"hf-to-orbax {os.path.basename(out)}",
                                            disable=not show_progress) as bar:
        writer = PyTreeWriter(os.path.join(tmp, WEIGHTS))
        tasks = _tasks(source, quantize)
        leaves = read_ahead([(read, shape, dtype) for _, read, _, _, (shape, dtype) in tasks], READ_AHEAD)
        for (key, _, item, completes, _), leaf in zip(tasks, leaves):
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
    nf4 = quantize != "none"
    if nf4:  # the one step of the conversion that needs JAX
        from mixtral_jax.checkpoints.nf4_layers import layer_quantizer

        quantize_layer = layer_quantizer(config, quantize)

    def nf4_slice(param, layer, out=None):  # the packed arrays and the parameter count
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
        elif nf4 and is_expert(param):
            tasks.append((leaf_key(param, layer), functools.partial(nf4_experts, param, layer), (param, layer),
                          True, (shape[1:], dtype)))
        elif nf4 and is_quantized(param):
            tasks.append((leaf_key(param, layer), functools.partial(nf4_slice, param, layer), (param, layer),
                          True, (shape, dtype)))
        else:
            tasks.append((leaf_key(param, layer), functools.partial(source.read, param, layer), (param, layer),
                          True, (shape, dtype)))
    return tasks


__all__ = ["convert_hf"]
