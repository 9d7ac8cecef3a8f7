"""`from_pretrained`: any model path, one loader. What a path holds is decided once (`checkpoint_kind`): an
HF directory (hf_model.py), an Orbax model checkpoint (orbax_load.py), or a training run directory, whose
model is its base (itself possibly a run: the recursion is here, in `build_model` and `load_run`) with the
run's trained weights restored from its checkpoints (run_state.py). open_source.py is the same dispatch for
the converters' host-side readers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from mixtral_jax.checkpoints import run_state
from mixtral_jax.checkpoints.hf_model import load_hf
from mixtral_jax.checkpoints.kinds import ORBAX, RUN, checkpoint_kind
from mixtral_jax.checkpoints.orbax_load import load as load_orbax
from mixtral_jax.checkpoints.run_manifest import (
    CHECKPOINTS,
    RunModel,
    base_path,
    is_run_dir,
    read_manifest,
)
from mixtral_jax.config import canonical_dtype
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model.lora import LoraConfig, init_adapters, merge_adapters
from mixtral_jax.model.nf4_base import quantize_model
from mixtral_jax.model.transformer import Mixtral


def from_pretrained(path: str | os.PathLike, dtype: Any = None, *, mesh=None, show_progress: bool = False,
                    lora: LoraConfig | None = None, lora_seed: int = 0, **implementation) -> Mixtral:
    """Loads an HF Mixtral directory, an Orbax model checkpoint, or a training run directory (the base it
    names with the run's latest trained weights applied). `dtype` sets parameter and compute dtype (default:
    the checkpoint's): "float32", "bfloat16", "float16", a short form ("bf16", "fp32", ...) or a dtype object
    (jnp.bfloat16, np.float32).

    `implementation` overrides our own config fields (moe_backend, scan_layers, remat_policy, ...).
    With `lora`, the targeted weights get fresh adapters (A random from `lora_seed`, B zero).
    With `mesh`, every parameter is placed with its sharding from the logical-axis rules as it is read.
    """
    path = os.fspath(path)
    if dtype is not None:  # jnp.bfloat16, "bf16", ...; a bad one is the caller's, not the checkpoint's
        dtype = canonical_dtype(dtype, "from_pretrained: argument 'dtype'")
    if checkpoint_kind(path) == RUN:
        if lora is not None:
            raise ValueError(f"from_pretrained: {path} is a training run, which brings its own adapters; "
                             "'lora' adds fresh ones to a base model only")
        return load_run(path, mesh=mesh, dtype=dtype, **implementation)
    return load_model_dir(path, dtype, mesh=mesh, show_progress=show_progress, lora=lora, lora_seed=lora_seed,
                          **implementation)


def load_model_dir(path: str, dtype: str | None = None, **kwargs) -> Mixtral:
    """An HF directory or an Orbax model checkpoint (not a run)."""
    return (load_orbax if checkpoint_kind(path) == ORBAX else load_hf)(path, dtype, **kwargs)


def build_model(run_model: RunModel, mesh=None, root: str | None = None):
    """The base with fresh adapters (A from `lora_seed`, B zero), quantised to NF4 when asked. A base that is
    itself a training run (SFT after pre-training) is that run's model with its adapters merged. `root`
    replaces the model at the bottom of such a chain (the full-precision weights of an NF4 base, say)."""
    base = base_path(run_model.base)
    if is_run_dir(base):
        model = load_run(base, mesh=mesh, merge=True, root=root, **run_model.implementation)
        model = _with_fresh_adapters(model, run_model)
    else:
        model = load_model_dir(root or base, run_model.dtype, mesh=mesh, lora=run_model.lora_config(),
                               lora_seed=run_model.lora_seed, **run_model.implementation)
    return quantize_model(model, run_model.quantize)


def _with_fresh_adapters(model: Mixtral, run_model: RunModel) -> Mixtral:
    """`model`'s weights in the run's dtype, with new adapters when the run trains LoRA."""
    config = model.config.replace(dtype=run_model.dtype, param_dtype=run_model.dtype)
    fresh = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0), lora=run_model.lora_config()))
    nnx.update(fresh, jax.tree.map(lambda x: x.astype(run_model.dtype), nnx.state(model, nnx.Param)))
    init_adapters(fresh, run_model.lora_seed)
    return fresh


def load_run(run_dir: str, step: int | None = None, mesh=None, merge: bool = False, root: str | None = None,
             merge_base: str = "full", dtype: str | None = None, **implementation):
    """The run's model with its trained weights of `step` (default: the latest checkpoint), in `dtype`
    (default: the run's); `implementation` overrides model fields that do not change the weights (moe_backend,
    scan_layers, ...). With `merge`, the
    adapters are folded into the base and removed: the full-precision base, as Chinese-Mixtral's release
    merged them, or with `merge_base="nf4"` the dequantised NF4 base the run trained on. `root` replaces
    the model at the bottom of a chain of runs (see `build_model`). A checkpoint that cannot be restored
    (files deleted or truncated) raises a CheckpointError naming it and the run's other steps; there is no
    fall-back to an older one (the trainer's resume falls back, and moves the damaged one aside)."""
    run_model = read_manifest(run_dir)
    run_model = dataclasses.replace(run_model, implementation={**run_model.implementation, **implementation},
                                    dtype=run_model.dtype if dtype is None
                                    else canonical_dtype(dtype, "load_run: argument 'dtype'"))
    if merge and merge_base == "full":
        run_model = dataclasses.replace(run_model, quantize="none")
    manager = run_state.open_manager(run_dir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"{os.path.join(run_dir, CHECKPOINTS)}: no checkpoint"
                                  f"{'' if step is None else f' for step {step}'} (steps: {list(manager.all_steps())})")
        model = build_model(run_model, mesh, root)
        graphdef, params, frozen = nnx.split(model, run_model.trainable(), ...)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        try:
            params, _, _ = run_state.restore(manager, step, params, shardings)
        except CheckpointError as err:  # no silent fall-back to an older step: name the others instead
            others = sorted(s for s in manager.all_steps() if s != step)
            raise CheckpointError(f"{err}; the run's other checkpoints: {others or 'none'}"
                                  + (f" (load_run(..., step={max(others)}) loads one)" if others else "")) from err
    finally:
        manager.close()
    model = nnx.merge(graphdef, params, frozen)
    return merge_adapters(model) if merge and run_model.lora is not None else model


__all__ = ["build_model", "from_pretrained", "load_model_dir", "load_run"]
