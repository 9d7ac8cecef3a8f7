"""Hugging Face checkpoints: `from_pretrained` (legacy per-expert or transformers-5 fused layout, one file or
sharded) and `save_pretrained` (the legacy layout, which every transformers version loads), for models in
JAX; the files themselves are hf_files.py's, the names and shapes layout.py's.

Loading streams: each of our stacked parameters is assembled from its HF tensors, read through memory maps,
moved to the device and its host buffer freed before the next, so peak host memory stays near the size of
the finished model plus one parameter.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mixtral_jax.config import MixtralConfig
from mixtral_jax.hf_files import CheckpointFiles, detect_mappings, write_pretrained
from mixtral_jax.layout import TensorMapping, hf_to_ours
from mixtral_jax.lora import LoRAParam, LoraConfig, init_adapters
from mixtral_jax.model import Mixtral
from mixtral_jax.safetensors_io import CheckpointError


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
    from mixtral_jax import checkpoint, runs  # a training run (local or gs://): its base with its trained weights

    if runs.is_run_dir(directory):
        return checkpoint.load_run(directory, mesh=mesh, **implementation)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    from mixtral_jax import orbax_load, orbax_model  # an Orbax model checkpoint (convert hf-to-orbax)

    if orbax_model.is_orbax_model(directory):
        return orbax_load.load(directory, dtype, mesh=mesh, lora=lora, lora_seed=lora_seed,
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


__all__ = ["from_pretrained", "save_pretrained"]
