"""Hugging Face checkpoint directories as files, with numpy alone: which safetensors file holds each tensor
(one file or sharded with an index), which layout they are in, and writing a model in the legacy layout one
layer-tensor at a time (`write_pretrained`). The model-level loader (hf_model.py) and the converters build
on it. No JAX here: the converters start without it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import shutil
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from mixtral_jax.checkpoints.name_map import (
    TensorMapping,
    fused_mappings,
    legacy_mappings,
    ours_to_hf_into,
)
from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.buffers import OneEntryCache, ThreadBuffer
from mixtral_jax.io.direct_files import DirectFile
from mixtral_jax.io.output_dir import output_directory
from mixtral_jax.io.read_ahead import read_ahead as read_ahead_of
from mixtral_jax.io.safetensors_files import SafetensorsFile, header_bytes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# ------------------------------------------------------------------------------------------------ reading
class CheckpointFiles:
    """The safetensors files of an HF directory and which file holds each tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index_path}: field 'weight_map' unreadable ({err!r})") from None
            for key, filename in weight_map.items():
                if not isinstance(filename, str) or os.path.basename(filename) != filename or not filename:
                    raise CheckpointError(f"{index_path}: field 'weight_map' names '{filename}' for '{key}'; "
                                          f"expected a file name inside the directory")
            for filename in sorted(set(weight_map.values())):
                if not os.path.exists(os.path.join(directory, filename)):
                    key = next(k for k, v in weight_map.items() if v == filename)
                    raise CheckpointError(f"{index_path}: shard '{filename}' (holding '{key}' and others) "
                                          f"is missing from {directory}")
            self.files = {name: SafetensorsFile(os.path.join(directory, name))
                          for name in sorted(set(weight_map.values()))}
            self.location = {}
            for filename, file in self.files.items():
                for key in file.keys():
                    if key in self.location:
                        raise CheckpointError(f"{directory}: tensor '{key}' is stored in both "
                                              f"'{self.location[key]}' and '{filename}'")
                    self.location[key] = filename
            for key, filename in weight_map.items():
                if self.location.get(key) != filename:
                    raise CheckpointError(f"{index_path}: names tensor '{key}' in '{filename}', which lacks it")
        else:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            if not names:
                raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
            self.files = {name: SafetensorsFile(os.path.join(directory, name)) for name in names}
            self.location = {key: name for name, f in self.files.items() for key in f.keys()}

    def read(self, key: str) -> np.ndarray:
        return self.files[self.location[key]].get(key)

    def read_copy(self, key: str, prefix: tuple[int, ...] = (), rows: slice | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
        """`tensor[prefix][rows]` copied with plain file reads (see SafetensorsFile.read), into `out` if
        given: nothing stays mapped."""
        return self.files[self.location[key]].read(key, prefix, rows, out)

    def shape(self, key: str) -> tuple:
        return self.files[self.location[key]].shape(key)

    def where(self, key: str) -> str:
        return os.path.join(self.directory, self.location[key])

    def dtype(self, key: str):
        return self.files[self.location[key]].dtype(key)


def _ignored(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


def detect_mappings(files: CheckpointFiles, config: MixtralConfig) -> list[TensorMapping]:
    fused = any(".mlp.experts." in key for key in files.location)
    mappings = fused_mappings(config) if fused else legacy_mappings(config)
    expected = {m.hf_key for m in mappings}
    for key in mappings:
        if key.hf_key not in files.location:
            raise CheckpointError(f"{files.directory}: tensor '{key.hf_key}' is missing "
                                  f"({'fused' if fused else 'legacy'} layout)")
    for key in sorted(files.location):
        if key not in expected and not _ignored(key):
            raise CheckpointError(f"{files.where(key)}: unexpected tensor '{key}' for this config")
    for m in mappings:
        if files.shape(m.hf_key) != m.hf_shape:
            raise CheckpointError(f"{files.where(m.hf_key)}: tensor '{m.hf_key}' has shape "
                                  f"{list(files.shape(m.hf_key))}, config.json implies {list(m.hf_shape)}")
    return mappings


# ------------------------------------------------------------------------------------------------ writing
def write_pretrained(config: MixtralConfig, read: Callable[[str, int | None], np.ndarray], path: str | os.PathLike,
                     *, max_shard_bytes: int | None = None, dtype: str | None = None, overwrite: bool = False,
                     extra_files: dict[str, str] | None = None, show_progress: bool = False,
                     read_part: Callable[[str, int, tuple, np.ndarray], np.ndarray] | None = None,
                     read_ahead: int = 1) -> None:
    """A streaming `save_pretrained`: `read(param, layer)` returns one layer-tensor in our layout (layer None
    for embed_tokens, norm.weight, lm_head), and it is called once per layer-tensor, in layer order, so the
    host holds one layer-tensor (plus the HF tensor being written) at a time, whatever the model size.
    With `read_part(param, layer, inner, out)` (inner: the expert index, e.g. (3,); out: a buffer of the
    reading thread's to fill where it fits, as in sources.py), the per-expert HF tensors are read one expert
    at a time instead, so the host holds one expert's matrix (plus its HF transpose).
    `read_ahead` tensors are read (and transposed) on as many threads while one is written: more than 1 only
    where `read` and `read_part` are thread-safe.

    Writes the legacy layout (per expert tensors, each layer's experts grouped by weight), sharded past
    `max_shard_bytes` with model.safetensors.index.json, config.json, and generation_config.json (copied from
    `extra_files` when given there, like the tokenizer files it names: output name -> source path).
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    out_dtype = np.dtype(dtype or config.param_dtype)
    shards = _plan_shards(config, out_dtype, max_shard_bytes)
    tensors = [m for shard in shards.tensors for m in shard]
    reader = _HFTensorReader(read, read_part, np.dtype(config.param_dtype))
    with output_directory(path) as tmp, tqdm(total=shards.total_bytes, unit="B", unit_scale=True,
                                             desc=f"writing {os.path.basename(path)}",
                                             disable=not show_progress) as bar:
        jobs = [(functools.partial(reader, m), m.hf_shape, out_dtype) for m in tensors]
        written = zip(tensors, read_ahead_of(jobs, read_ahead))
        for filename, shard in zip(shards.names, shards.tensors):
            with DirectFile(os.path.join(tmp, filename)) as f:
                f.write(header_bytes([(m.hf_key, out_dtype, m.hf_shape) for m in shard]))
                for m, tensor in itertools.islice(written, len(shard)):
                    if tensor.shape != tuple(m.hf_shape):
                        raise CheckpointError(f"{m.hf_key}: source gives shape {list(tensor.shape)}, "
                                              f"config implies {list(m.hf_shape)}")
                    f.write(memoryview(tensor.reshape(-1).view(np.uint8)))
                    bar.update(shards.nbytes[m.hf_key])
        _write_metadata(tmp, config, out_dtype, shards, extra_files or {})


@dataclasses.dataclass(frozen=True)
class _Shards:
    """The legacy-layout tensors in file order, split into files of at most `max_shard_bytes`."""

    tensors: list[list[TensorMapping]]
    names: list[str]
    nbytes: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def _plan_shards(config: MixtralConfig, out_dtype: np.dtype, max_shard_bytes: int | None) -> _Shards:
    groups: dict[tuple, list[TensorMapping]] = {}  # each layer-tensor's HF tensors together, in layer order
    for m in legacy_mappings(config):
        groups.setdefault((m.param, m.index[0] if m.param.startswith("layers.") else None), []).append(m)
    ordered = [m for group in groups.values() for m in group]
    nbytes = {m.hf_key: out_dtype.itemsize * int(np.prod(m.hf_shape, dtype=np.int64)) for m in ordered}
    shards, current, current_bytes = [], [], 0
    for m in ordered:
        if current and max_shard_bytes is not None and current_bytes + nbytes[m.hf_key] > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(m)
        current_bytes += nbytes[m.hf_key]
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                     for i in range(len(shards))]
    return _Shards(shards, names, nbytes)


class _HFTensorReader:
    """One HF tensor (legacy layout) into a given buffer: an expert's matrix through `read_part` where the
    source has it (each read thread's matrix in our layout kept in a per-thread buffer), else a slice of the
    layer-tensor that `read` returned, held until another layer-tensor is asked."""

    def __init__(self, read, read_part, part_dtype: np.dtype):
        self.read_part, self.part_dtype = read_part, part_dtype
        self.layer_tensor = OneEntryCache(read)
        self.parts = ThreadBuffer()

    def __call__(self, m: TensorMapping, out: np.ndarray) -> np.ndarray:
        layer = m.index[0] if m.param.startswith("layers.") else None
        inner = tuple(m.index[1:] if layer is not None else m.index)
        if self.read_part is not None and inner:
            self.layer_tensor.clear()
            ours = np.asarray(self.read_part(m.param, layer, inner,
                                             self.parts.take((m.hf_shape[1], m.hf_shape[0]), self.part_dtype)))
        else:
            ours = np.asarray(self.layer_tensor.get(m.param, layer))[inner]
        expected = (m.hf_shape[1], m.hf_shape[0]) if m.kind == "linear" else tuple(m.hf_shape)
        if int(np.prod(ours.shape, dtype=np.int64)) != int(np.prod(expected, dtype=np.int64)):
            raise CheckpointError(f"{m.hf_key}: source gives shape {list(ours.shape)}, config implies "
                                  f"{list(m.hf_shape)}")
        return ours_to_hf_into(m, ours, out)


def _write_metadata(directory: str, config: MixtralConfig, out_dtype: np.dtype, shards: _Shards,
                    extra_files: dict[str, str]) -> None:
    """The index (when sharded), config.json, generation_config.json and the files copied along."""
    if len(shards.names) > 1:
        weight_map = {m.hf_key: name for name, shard in zip(shards.names, shards.tensors) for m in shard}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": shards.total_bytes}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config.to_hf(), "torch_dtype": str(out_dtype)}, f, indent=2)
    if "generation_config.json" not in extra_files:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
    for name, source in extra_files.items():
        shutil.copyfile(source, os.path.join(directory, name))


__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointFiles", "detect_mappings", "write_pretrained"]
