"""PEFT LoRA adapters: ours written as the files peft writes for a MixtralForCausalLM, and such files loaded.

The layout is the one Chinese-Mixtral released (peft over transformers 4's per-expert Linear modules): for each
adapted weight `base_model.model.<HF name without .weight>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r],
one pair per expert, plus the whole tensors of modules_to_save under `base_model.model.<HF name>`. Our A [*in, r]
and B [r, *out] are their transposes with the in/out dims flattened exactly as the adapted weight's own, so the
tensors reuse name_map's mappings of the weights.

peft 0.21 on transformers 5 (fused experts) converts these per-expert keys when it loads them (A concatenated,
B block-diagonal, into `mlp.experts` parameter wrappers), but its parameter wrappers refuse lora_dropout != 0:
such an adapter (the recipe's 0.05) loads there only with the config's lora_dropout overridden to 0, which
changes nothing at inference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.checkpoints.name_map import (
    TensorMapping,
    hf_to_ours,
    legacy_mappings,
    ours_to_hf,
)
from mixtral_jax.checkpoints.pretrained import from_pretrained
from mixtral_jax.checkpoints.run_manifest import is_run_dir
from mixtral_jax.config import MixtralConfig, read_json_object
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.output_dir import output_directory
from mixtral_jax.io.safetensors_files import SafetensorsFile, write_safetensors
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.model.targets import LINEAR_WEIGHTS
from mixtral_jax.model.transformer import Mixtral

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"

# Every field of peft 0.21's LoraConfig at its default, as `save_pretrained` writes them (sorted, indent 2).
_PEFT_DEFAULTS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": False,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": None, "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}

# Settings that change what an adapter computes and that we do not implement: any other value is refused
# rather than silently ignored. (`target_parameters` is what peft writes for transformers 5's fused experts.)
_ACCEPTED = {
    "bias": ("none",), "use_rslora": (False,), "use_dora": (False,), "fan_in_fan_out": (False,),
    "lora_bias": (False,), "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "exclude_modules": (None, []),
    "layers_to_transform": (None, []), "layer_replication": (None, []), "target_parameters": (None, []),
    "trainable_token_indices": (None,),
}


def adapter_mappings(config: MixtralConfig, targets: Sequence[str], modules_to_save: Sequence[str],
                     rank: int) -> list[TensorMapping]:
    """Each tensor of the adapter file (`hf_key`) and the slice of our parameter (`param`) it holds."""
    maps = []
    for m in legacy_mappings(config):
        if m.param.startswith("layers."):
            if m.param.rpartition(".")[2] in targets:
                stem, (out, inp) = PREFIX + m.hf_key.removesuffix(".weight"), m.hf_shape
                maps += [dataclasses.replace(m, hf_key=f"{stem}.lora_A.weight", param=f"{m.param}_lora_a",
                                             hf_shape=(rank, inp)),
                         dataclasses.replace(m, hf_key=f"{stem}.lora_B.weight", param=f"{m.param}_lora_b",
                                             hf_shape=(out, rank))]
        elif m.param.split(".")[0] in modules_to_save:
            maps.append(dataclasses.replace(m, hf_key=PREFIX + m.hf_key))
    return maps


def _savable(config: MixtralConfig) -> list[str]:
    """The modules outside the decoder layers (what modules_to_save may name)."""
    return [m.param.split(".")[0] for m in legacy_mappings(config) if not m.param.startswith("layers.")]


def peft_config_dict(lora: LoraConfig, modules_to_save: Sequence[str] = (),
                     base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json as peft 0.21's PeftModelForCausalLM.save_pretrained writes it (inference_mode true)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {**_PEFT_DEFAULTS, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
            "lora_alpha": alpha, "lora_dropout": lora.dropout, "modules_to_save": list(modules_to_save) or None,
            "r": lora.rank, "target_modules": list(lora.targets), "task_type": "CAUSAL_LM"}


def save_peft_adapter(model: Mixtral, out_dir: str | os.PathLike,
                      modules_to_save: Sequence[str] = ("embed_tokens", "lm_head"),
                      base_model_name_or_path: str | None = None, *, overwrite: bool = False) -> None:
    """Writes adapter_config.json and adapter_model.safetensors (the model's adapters in fp32 or their own
    dtype, modules_to_save in the model's). Assembled under a temporary name beside `out_dir`, then renamed."""
    path = os.fspath(out_dir)
    if model.lora is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters")
    unknown = sorted(set(modules_to_save) - set(_savable(model.config)))
    if unknown:
        raise ValueError(f"save_peft_adapter: modules_to_save names '{unknown[0]}'; this model has "
                         f"{', '.join(_savable(model.config))}")
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    params = _params(model)
    host: dict[str, np.ndarray] = {}  # each parameter fetched from the device once
    tensors = []
    for m in adapter_mappings(model.config, model.lora.targets, modules_to_save, model.lora.rank):
        if m.param not in host:
            host[m.param] = np.asarray(jax.device_get(params[m.param].get_value()))
        tensors.append((m.hf_key, np.ascontiguousarray(ours_to_hf(m, host[m.param][m.index]))))

    with output_directory(path) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS_FILE), tensors)
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(peft_config_dict(model.lora, modules_to_save, base_model_name_or_path), indent=2,
                               sort_keys=True))


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, tuple[str, ...]]:
    """(our LoraConfig, modules_to_save) of a peft adapter directory; a field we cannot honour is an error."""
    path = os.path.join(os.fspath(adapter_dir), CONFIG_FILE)
    values = read_json_object(path, CheckpointError)

    def bad(field: str, why: str):
        return CheckpointError(f"{path}: field '{field}' {why}")

    for field in ("peft_type", "r", "lora_alpha", "target_modules"):
        if field not in values:
            raise bad(field, "is missing")
    if values["peft_type"] != "LORA":
        raise bad("peft_type", f"is {values['peft_type']!r}; only LORA adapters are supported")
    r, alpha, dropout = values["r"], values["lora_alpha"], values.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad("r", f"must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise bad("lora_alpha", f"must be a number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise bad("lora_dropout", f"must be a number in [0, 1), got {dropout!r}")
    targets = values["target_modules"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise bad("target_modules", f"must be a non-empty list of module names, got {targets!r}")
    unknown = sorted(set(targets) - set(LINEAR_WEIGHTS))
    if unknown:
        raise bad("target_modules", f"names '{unknown[0]}' (supported: {', '.join(LINEAR_WEIGHTS)})")
    for field, accepted in _ACCEPTED.items():
        if values.get(field, accepted[0]) not in accepted:
            raise bad(field, f"is {values[field]!r}, which is not supported (only {accepted[0]!r})")
    modules = values.get("modules_to_save") or []
    if not isinstance(modules, list) or not all(isinstance(n, str) for n in modules):
        raise bad("modules_to_save", f"must be a list of module names, got {modules!r}")
    targets = tuple(t for t in LINEAR_WEIGHTS if t in targets)
    return LoraConfig(rank=r, alpha=float(alpha), dropout=float(dropout), targets=targets), tuple(modules)


def load_peft_adapter(base_model_or_dir: Mixtral | str | os.PathLike, adapter_dir: str | os.PathLike,
                      **from_pretrained_kwargs) -> Mixtral:
    """The base (an HF directory, loaded with `from_pretrained_kwargs`, or a model without adapters, whose
    arrays are shared) with the adapter's LoRA weights and modules_to_save.

    Every tensor is checked against the base before any is read: a missing, unexpected or misshapen one is
    an error naming it.
    """
    lora, modules_to_save = read_adapter_config(adapter_dir)
    weights_path = os.path.join(os.fspath(adapter_dir), WEIGHTS_FILE)
    if not os.path.exists(weights_path) and os.path.exists(os.path.join(os.fspath(adapter_dir), "adapter_model.bin")):
        raise CheckpointError(f"{weights_path}: not found; adapter_model.bin (pickle) is not read, convert it "
                              f"to safetensors first")
    file = SafetensorsFile(weights_path)
    if isinstance(base_model_or_dir, Mixtral):
        model = _with_adapters(base_model_or_dir, lora)
    elif is_run_dir(os.fspath(base_model_or_dir)):
        raise CheckpointError(f"{os.fspath(base_model_or_dir)}: a training run, not an HF base directory")
    else:
        model = from_pretrained(base_model_or_dir, lora=lora, **from_pretrained_kwargs)
    savable = _savable(model.config)
    unknown = sorted(set(modules_to_save) - set(savable))
    if unknown:
        raise CheckpointError(f"{os.path.join(os.fspath(adapter_dir), CONFIG_FILE)}: field 'modules_to_save' "
                              f"names '{unknown[0]}'; the base model has {', '.join(savable)}")
    mappings = adapter_mappings(model.config, lora.targets, modules_to_save, lora.rank)
    expected, present = {m.hf_key for m in mappings}, set(file.keys())
    for key in file.keys():
        if key not in expected:
            raise CheckpointError(f"{weights_path}: unexpected tensor '{key}' for targets "
                                  f"{', '.join(lora.targets)} and modules_to_save {list(modules_to_save)}")
    for m in mappings:
        if m.hf_key not in present:
            raise CheckpointError(f"{weights_path}: tensor '{m.hf_key}' is missing")
        if file.shape(m.hf_key) != m.hf_shape:
            raise CheckpointError(f"{weights_path}: tensor '{m.hf_key}' has shape {list(file.shape(m.hf_key))}; "
                                  f"the base model (r={lora.rank}) needs {list(m.hf_shape)}")
    params = _params(model)
    by_param: dict[str, list[TensorMapping]] = {}
    for m in mappings:
        by_param.setdefault(m.param, []).append(m)
    for name, maps in by_param.items():
        variable = params[name]
        old = variable.get_value()
        buffer = np.empty(old.shape, np.dtype(old.dtype))
        for m in maps:
            target = buffer[m.index]
            target[...] = hf_to_ours(m, file.get(m.hf_key), target.shape).astype(buffer.dtype)
        sharding = old.sharding if isinstance(old, jax.Array) else None
        variable.set_value(jnp.asarray(buffer) if sharding is None else jax.device_put(buffer, sharding))
    return model


def _with_adapters(base: Mixtral, lora: LoraConfig) -> Mixtral:
    """A model holding `base`'s arrays plus (abstract, to be filled) adapters for `lora`."""
    if base.lora is not None:
        raise ValueError("load_peft_adapter: the base model already has LoRA adapters; pass a plain base "
                         "(merge_adapters folds adapters into it)")
    model = nnx.eval_shape(lambda: Mixtral(base.config, rngs=nnx.Rngs(0), lora=lora))
    nnx.update(model, nnx.state(base))
    return model


def _params(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): variable for path, variable in nnx.iter_graph(model)
            if isinstance(variable, nnx.Param)}


__all__ = ["adapter_mappings", "load_peft_adapter", "peft_config_dict", "read_adapter_config",
           "save_peft_adapter"]
