"""Hugging Face checkpoint directories as files, with numpy alone: which safetensors file holds each tensor
(one file or sharded with an index), which layout they are in, and writing a model in the legacy layout one
layer-tensor at a time (`write_pretrained`). The model-level loaders (hf_checkpoint.py) and the converters
(convert/) build on it; keeping JAX out of it keeps the converters' start-up short (layout.py).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from mixtral_jax.config import MixtralConfig
from mixtral_jax.direct_io import DirectFile
from mixtral_jax.host_arrays import BufferRing, ThreadBuffer
from mixtral_jax.layout import TensorMapping, fused_mappings, legacy_mappings, ours_to_hf_into
from mixtral_jax.output_dir import output_directory
from mixtral_jax.safetensors_io import CheckpointError, SafetensorsFile, header_bytes

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
    reading thread's to fill where it fits, as in layer_tensors), the per-expert HF tensors are read one expert
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
    groups: dict[tuple, list[TensorMapping]] = {}
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
    cached: list = [None, None]  # (param, layer) and its layer-tensor: the one held on the host
    cache_lock = threading.Lock()
    # Each HF tensor's buffer: one being written, `read_ahead` being filled. Taken in order on this thread
    # when the read is submitted, so a buffer comes back only after the tensor that last held it was written.
    ring = BufferRing(depth=read_ahead + 1)
    parts = ThreadBuffer()  # each read thread's expert matrix in our layout, used up before it reads the next
    part_dtype = np.dtype(config.param_dtype)

    def hf_tensor(m: TensorMapping, out: np.ndarray) -> np.ndarray:
        layer = m.index[0] if m.param.startswith("layers.") else None
        inner = m.index[1:] if layer is not None else m.index
        if read_part is not None and inner:
            with cache_lock:
                cached[0], cached[1] = None, None
            ours = np.asarray(read_part(m.param, layer, tuple(inner),
                                        parts.take((m.hf_shape[1], m.hf_shape[0]), part_dtype)))
        else:
            with cache_lock:
                if cached[0] != (m.param, layer):
                    cached[0], cached[1] = None, None
                    cached[1] = read(m.param, layer)
                    cached[0] = (m.param, layer)
                ours = np.asarray(cached[1])[inner]
        expected = (m.hf_shape[1], m.hf_shape[0]) if m.kind == "linear" else tuple(m.hf_shape)
        if int(np.prod(ours.shape, dtype=np.int64)) != int(np.prod(expected, dtype=np.int64)):
            raise CheckpointError(f"{m.hf_key}: source gives shape {list(ours.shape)}, config implies "
                                  f"{list(m.hf_shape)}")
        return ours_to_hf_into(m, ours, out)

    with output_directory(path) as tmp, tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True,
                                             desc=f"writing {os.path.basename(path)}",
                                             disable=not show_progress) as bar:
        weight_map = {}
        # The next `read_ahead` HF tensors are read and transposed on background threads while one is written.
        pool = ThreadPoolExecutor(read_ahead, thread_name_prefix="read-ahead")
        flat = [m for shard in shards for m in shard]

        def submit(i: int):
            return pool.submit(hf_tensor, flat[i], ring.take(flat[i].hf_shape, out_dtype))

        ahead = collections.deque(submit(i) for i in range(min(read_ahead, len(flat))))

        def next_tensor(i: int) -> np.ndarray:
            tensor = ahead.popleft().result()
            if i + read_ahead < len(flat):
                ahead.append(submit(i + read_ahead))
            return tensor

        count = 0
        for filename, shard in zip(names, shards):
            weight_map.update((m.hf_key, filename) for m in shard)
            with DirectFile(os.path.join(tmp, filename)) as f:
                f.write(header_bytes([(m.hf_key, out_dtype, m.hf_shape) for m in shard]))
                for m in shard:
                    tensor = next_tensor(count)
                    count += 1
                    if tensor.shape != tuple(m.hf_shape):
                        raise CheckpointError(f"{m.hf_key}: source gives shape {list(tensor.shape)}, "
                                              f"config implies {list(m.hf_shape)}")
                    f.write(memoryview(tensor.reshape(-1).view(np.uint8)))
                    bar.update(nbytes[m.hf_key])
        pool.shutdown(cancel_futures=True)
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config.to_hf(), "torch_dtype": str(out_dtype)}, f, indent=2)
        extra = dict(extra_files or {})
        if "generation_config.json" not in extra:
            with open(os.path.join(tmp, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, f, indent=2)
        for name, source in extra.items():
            shutil.copyfile(source, os.path.join(tmp, name))


__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointFiles", "detect_mappings", "write_pretrained"]
