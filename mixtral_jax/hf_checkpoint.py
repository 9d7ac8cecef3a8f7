"""Hugging Face checkpoints: `from_pretrained` (legacy per-expert or transformers-5 fused layout, one file or
sharded) and `save_pretrained` (the legacy layout, which every transformers version loads).

Loading streams: each of our stacked parameters is assembled from its HF tensors, read through memory maps,
moved to the device and its host buffer freed before the next, so peak host memory stays near the size of
the finished model plus one parameter.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mixtral_jax.config import ConfigError, MixtralConfig
from mixtral_jax.host_arrays import BufferRing, ThreadBuffer, transpose_into
from mixtral_jax.lora import LoRAParam, LoraConfig, init_adapters
from mixtral_jax.model import Mixtral
from mixtral_jax.output_dir import output_directory
from mixtral_jax.safetensors_io import CheckpointError, SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor and the slice of one of our parameters it fills.

    `kind` says how the two relate: "copy" (same layout), "linear" (HF [out, in] against our [in, ...out]:
    transpose and reshape), or "fused_w1" / "fused_w3" / "fused_w2" (transformers 5's stacked experts).
    """

    hf_key: str
    param: str            # our parameter path, dotted
    index: tuple          # index into our (stacked) parameter
    hf_shape: tuple
    kind: str


def legacy_mappings(config: MixtralConfig) -> list[TensorMapping]:
    """Every tensor of the Hub's layout (what `save_pretrained` writes and releases use)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd, h, kv = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    maps = [TensorMapping("model.embed_tokens.weight", "embed_tokens", (), (v, d), "copy"),
            TensorMapping("model.norm.weight", "norm.weight", (), (d,), "copy")]
    if not config.tie_word_embeddings:
        maps.append(TensorMapping("lm_head.weight", "lm_head", (), (v, d), "linear"))
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        maps += [
            TensorMapping(f"{p}.input_layernorm.weight", "layers.input_layernorm.weight", (layer,), (d,), "copy"),
            TensorMapping(f"{p}.post_attention_layernorm.weight", "layers.post_attention_layernorm.weight",
                          (layer,), (d,), "copy"),
            TensorMapping(f"{p}.self_attn.q_proj.weight", "layers.self_attn.q_proj", (layer,), (h * hd, d), "linear"),
            TensorMapping(f"{p}.self_attn.k_proj.weight", "layers.self_attn.k_proj", (layer,), (kv * hd, d), "linear"),
            TensorMapping(f"{p}.self_attn.v_proj.weight", "layers.self_attn.v_proj", (layer,), (kv * hd, d), "linear"),
            TensorMapping(f"{p}.self_attn.o_proj.weight", "layers.self_attn.o_proj", (layer,), (d, h * hd), "linear"),
            TensorMapping(f"{p}.block_sparse_moe.gate.weight", "layers.block_sparse_moe.gate", (layer,),
                          (config.num_local_experts, d), "linear"),
        ]
        for e in range(config.num_local_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            maps += [TensorMapping(f"{q}.w1.weight", "layers.block_sparse_moe.w1", (layer, e), (f, d), "linear"),
                     TensorMapping(f"{q}.w2.weight", "layers.block_sparse_moe.w2", (layer, e), (d, f), "linear"),
                     TensorMapping(f"{q}.w3.weight", "layers.block_sparse_moe.w3", (layer, e), (f, d), "linear")]
    return maps


def fused_mappings(config: MixtralConfig) -> list[TensorMapping]:
    """transformers 5's in-memory layout: `mlp.gate`, `mlp.experts.gate_up_proj` [E, 2F, D], `down_proj`."""
    d, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    maps = []
    for m in legacy_mappings(config):
        if ".block_sparse_moe.experts." in m.hf_key:
            continue
        maps.append(dataclasses.replace(m, hf_key=m.hf_key.replace(".block_sparse_moe.gate.", ".mlp.gate.")))
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        maps += [TensorMapping(f"{p}.gate_up_proj", "layers.block_sparse_moe.w1", (layer,), (e, 2 * f, d), "fused_w1"),
                 TensorMapping(f"{p}.gate_up_proj", "layers.block_sparse_moe.w3", (layer,), (e, 2 * f, d), "fused_w3"),
                 TensorMapping(f"{p}.down_proj", "layers.block_sparse_moe.w2", (layer,), (e, d, f), "fused_w2")]
    return maps


def hf_to_ours(mapping: TensorMapping, tensor: np.ndarray, target_shape: tuple) -> np.ndarray:
    f = mapping.hf_shape[1] // 2 if mapping.kind in ("fused_w1", "fused_w3") else None
    if mapping.kind == "copy":
        return tensor.reshape(target_shape)
    if mapping.kind == "linear":
        return tensor.T.reshape(target_shape)
    if mapping.kind == "fused_w1":
        return tensor[:, :f, :].transpose(0, 2, 1)
    if mapping.kind == "fused_w3":
        return tensor[:, f:, :].transpose(0, 2, 1)
    return tensor.transpose(0, 2, 1)  # fused_w2


def ours_to_hf(mapping: TensorMapping, array: np.ndarray) -> np.ndarray:
    if mapping.kind == "copy":
        return array.reshape(mapping.hf_shape)
    if mapping.kind == "linear":
        return array.reshape(mapping.hf_shape[1], mapping.hf_shape[0]).T
    raise ValueError(f"we write only the legacy layout, not {mapping.kind}")


def ours_to_hf_into(mapping: TensorMapping, array: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`ours_to_hf(mapping, array)` written into `out` (C-contiguous, HF shape, any dtype) without numpy's slow
    transposed copies."""
    if mapping.kind == "copy":
        out[...] = array.reshape(mapping.hf_shape)
        return out
    if mapping.kind == "linear":
        return transpose_into(array.reshape(mapping.hf_shape[1], mapping.hf_shape[0]), out)
    raise ValueError(f"we write only the legacy layout, not {mapping.kind}")


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


def from_pretrained(path: str | os.PathLike, dtype: str | None = None, *, mesh=None, show_progress: bool = False,
                    lora: LoraConfig | None = None, lora_seed: int = 0, **implementation) -> Mixtral:
    """Loads an HF Mixtral directory, or a training run directory (the base it names with the run's latest
    trained weights applied; see checkpoint.py). `dtype` sets parameter and compute dtype (default: the
    checkpoint's).

    `implementation` overrides our own config fields (moe_backend, scan_layers, remat_policy, ...).
    With `lora`, the targeted weights get fresh adapters (A random from `lora_seed`, B zero).
    With `mesh`, every parameter is placed with its sharding from the logical-axis rules as it is read.
    """
    directory = os.fspath(path)
    from mixtral_jax import checkpoint  # a training run (local or gs://): its base with its trained weights

    if checkpoint.is_run_dir(directory):
        return checkpoint.load_run(directory, mesh=mesh, **implementation)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    from mixtral_jax import orbax_model  # an Orbax model checkpoint (convert hf-to-orbax)

    if orbax_model.is_orbax_model(directory):
        return orbax_model.load(directory, dtype, mesh=mesh, lora=lora, lora_seed=lora_seed,
                                show_progress=show_progress, **implementation)
    MixtralConfig.from_hf(directory)  # a bad config.json is reported before any tensor is looked at
    files = CheckpointFiles(directory)
    if dtype is None:
        key = "model.embed_tokens.weight"
        dtype = str(files.dtype(key)) if key in files.location else "float32"
    config = MixtralConfig.from_hf(directory, **{"dtype": dtype, "param_dtype": dtype, **implementation})
    mappings = detect_mappings(files, config)

    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0), lora=lora))
    params = dict(_named_params(model))
    by_param: dict[str, list[TensorMapping]] = {}
    for m in mappings:
        by_param.setdefault(m.param, []).append(m)
    placement = _placement(model, mesh)
    for name in tqdm(by_param, desc=f"loading {os.path.basename(directory)}", disable=not show_progress):
        variable = params[name]
        shape, pdtype = variable.get_value().shape, variable.get_value().dtype
        buffer = np.empty(shape, np.dtype(pdtype))
        for m in by_param[name]:
            target = buffer[m.index]
            target[...] = hf_to_ours(m, files.read(m.hf_key), target.shape).astype(buffer.dtype)
        variable.set_value(placement(name, buffer))
        del buffer
    if lora is not None:
        init_adapters(model, lora_seed)
        for path, variable in nnx.iter_graph(model):  # only the adapters: the base is already placed
            if isinstance(variable, LoRAParam):
                name = ".".join(str(p) for p in path)
                variable.set_value(placement(name, np.asarray(variable.get_value())))
    return model


def _named_params(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and not isinstance(variable, LoRAParam):
            yield ".".join(str(p) for p in path), variable


def _placement(model, mesh) -> Callable[[str, np.ndarray], jax.Array]:
    if mesh is None:
        return lambda name, array: jnp.asarray(array)
    from mixtral_jax import sharding  # the mesh machinery is needed only when a mesh is given

    return sharding.param_placer(model, mesh)


# ------------------------------------------------------------------------------------------------ writing
def save_pretrained(model: Mixtral, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
                    dtype: str | None = None, overwrite: bool = False) -> None:
    """Writes config.json, generation_config.json and legacy-layout safetensors (sharded past max_shard_bytes),
    through `write_pretrained`: one layer-tensor at a time comes from the devices to the host.

    The directory is assembled under a temporary name beside `path` and renamed when complete.
    """
    params = dict(_named_params(model))

    def read(param: str, layer: int | None) -> np.ndarray:
        value = params[param][...]
        return np.asarray(jax.device_get(value if layer is None else value[layer]))

    write_pretrained(model.config, read, path, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)


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
    import shutil

    from mixtral_jax.direct_io import DirectFile
    from mixtral_jax.safetensors_io import header_bytes

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
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
    part_dtype = np.dtype(jnp.dtype(config.param_dtype))

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
        from concurrent.futures import ThreadPoolExecutor

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


__all__ = ["from_pretrained", "save_pretrained", "write_pretrained", "CheckpointError", "ConfigError", "legacy_mappings",
           "fused_mappings", "ours_to_hf_into"]
