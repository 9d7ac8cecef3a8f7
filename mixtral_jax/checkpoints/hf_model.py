"""Models in JAX to and from Hugging Face directories: `load_hf` (legacy per-expert or transformers-5 fused
layout, one file or sharded) and `save_pretrained` (the legacy layout, which every transformers version
loads). The files themselves are hf_files.py's, the names and shapes name_map.py's; which loader a path
needs is pretrained.py's to decide.

Loading streams: each of our stacked parameters is assembled from its HF tensors, read through memory maps,
moved to the device and its host buffer freed before the next, so peak host memory stays near the size of
the finished model plus one parameter.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mixtral_jax.checkpoints.hf_files import (
    CheckpointFiles,
    detect_mappings,
    write_pretrained,
)
from mixtral_jax.checkpoints.name_map import TensorMapping, hf_to_ours
from mixtral_jax.checkpoints.placement import (
    add_fresh_adapters,
    named_params,
    placement,
)
from mixtral_jax.config import MixtralConfig, canonical_dtype
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.model.transformer import Mixtral


def load_hf(path: str | os.PathLike, dtype: Any = None, *, mesh=None, show_progress: bool = False,
            lora: LoraConfig | None = None, lora_seed: int = 0, **implementation) -> Mixtral:
    """The model of an HF Mixtral directory; arguments as `from_pretrained`'s."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    if dtype is not None:
        dtype = canonical_dtype(dtype, "load_hf: argument 'dtype'")
    MixtralConfig.from_hf(directory)  # a bad config.json is reported before any tensor is looked at
    files = CheckpointFiles(directory)
    if dtype is None:
        key = "model.embed_tokens.weight"
        dtype = str(files.dtype(key)) if key in files.location else "float32"
    config = MixtralConfig.from_hf(directory, **{"dtype": dtype, "param_dtype": dtype, **implementation})
    mappings = detect_mappings(files, config)

    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0), lora=lora))
    params = dict(named_params(model))
    by_param: dict[str, list[TensorMapping]] = {}
    for m in mappings:
        by_param.setdefault(m.param, []).append(m)
    place = placement(model, mesh)
    for name in tqdm(by_param, desc=f"loading {os.path.basename(directory)}", disable=not show_progress):
        variable = params[name]
        shape, pdtype = variable.get_value().shape, variable.get_value().dtype
        buffer = np.empty(shape, np.dtype(pdtype))
        for m in by_param[name]:
            target = buffer[m.index]
            target[...] = hf_to_ours(m, files.read(m.hf_key), target.shape).astype(buffer.dtype)
        variable.set_value(place(name, buffer))
        del buffer
    if lora is not None:
        add_fresh_adapters(model, mesh, lora_seed)
    return model


# ------------------------------------------------------------------------------------------------ writing
def save_pretrained(model: Mixtral, path: str | os.PathLike, *, max_shard_bytes: int | None = None,
                    dtype: Any = None, overwrite: bool = False) -> None:
    """Writes config.json, generation_config.json and legacy-layout safetensors (sharded past max_shard_bytes),
    through `write_pretrained`: one layer-tensor at a time comes from the devices to the host.

    The directory is assembled under a temporary name beside `path` and renamed when complete. `dtype` (default:
    the model's parameter dtype) is a name, a short form ("bf16") or a dtype object (jnp.bfloat16).
    """
    if dtype is not None:
        dtype = canonical_dtype(dtype, "save_pretrained: argument 'dtype'")
    params = dict(named_params(model))

    def read(param: str, layer: int | None) -> np.ndarray:
        value = params[param][...]
        return np.asarray(jax.device_get(value if layer is None else value[layer]))

    write_pretrained(model.config, read, path, max_shard_bytes=max_shard_bytes, dtype=dtype, overwrite=overwrite)


__all__ = ["load_hf", "save_pretrained"]
