"""Training-run checkpoints: the run directory's layout, shared by the trainer (which writes it) and
`from_pretrained(run_dir)` (which reads it); the manifest, model.json, is runs.py's.

    RUN_DIR/model.json               what the trained model is: the base it references (never copied), dtype,
                                     NF4 or not, the LoRA settings, which weights are trained in full
    RUN_DIR/checkpoints/STEP/        Orbax: `params` (trainable weights only), `opt_state`, `meta` (JSON:
                                     step, data position, RNG, ...)

RUN_DIR may be a gs:// URL (mixtral_jax/paths.py). Orbax's CheckpointManager commits each step atomically
(a step directory appears only when complete), keeps `max_to_keep` and saves asynchronously; restoring
takes abstract arrays with shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from mixtral_jax import paths
from mixtral_jax.lora import init_adapters, merge_adapters
from mixtral_jax.model import Mixtral
from mixtral_jax.runs import CHECKPOINTS, RunModel, base_path, is_run_dir, read_manifest
from mixtral_jax.safetensors_io import CheckpointError

if TYPE_CHECKING:
    import orbax.checkpoint as ocp


def build_model(run_model: RunModel, mesh=None, root: str | None = None):
    """The base with fresh adapters (A from `lora_seed`, B zero), quantised to NF4 when asked. A base that is
    itself a training run (SFT after pre-training) is that run's model with its adapters merged. `root`
    replaces the model at the bottom of such a chain (the full-precision weights of an NF4 base, say)."""
    from mixtral_jax.hf_checkpoint import from_pretrained
    from mixtral_jax.quantized import quantize_base

    base = base_path(run_model.base)
    if is_run_dir(base):
        model = load_run(base, mesh=mesh, merge=True, root=root, **run_model.implementation)
        model = _with_fresh_adapters(model, run_model)
    else:
        model = from_pretrained(root or base, run_model.dtype, mesh=mesh, lora=run_model.lora_config(),
                                lora_seed=run_model.lora_seed, **run_model.implementation)
    return quantize_base(model) if run_model.quantize == "nf4" else model


def _with_fresh_adapters(model: Mixtral, run_model: RunModel) -> Mixtral:
    """`model`'s weights in the run's dtype, with new adapters when the run trains LoRA."""
    config = model.config.replace(dtype=run_model.dtype, param_dtype=run_model.dtype)
    fresh = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0), lora=run_model.lora_config()))
    nnx.update(fresh, jax.tree.map(lambda x: x.astype(run_model.dtype), nnx.state(model, nnx.Param)))
    init_adapters(fresh, run_model.lora_seed)
    return fresh


def open_manager(run_dir: str, max_to_keep: int | None = None, async_save: bool = True) -> ocp.CheckpointManager:
    import orbax.checkpoint as ocp  # imported when used: from_pretrained of an HF directory never needs it

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    directory = paths.as_path(os.path.join(run_dir, CHECKPOINTS))
    return ocp.CheckpointManager(directory if paths.is_remote(run_dir) else directory.resolve(), options=options)


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict[str, Any]) -> None:
    """Starts writing a step (in the background when the manager is asynchronous)."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               opt_state=ocp.args.StandardSave(opt_state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(manager: ocp.CheckpointManager, step: int, params_like, params_shardings, opt_like=None,
            opt_shardings=None):
    """(params, opt_state or None, meta) of `step`, placed with the given shardings (any mesh)."""
    import orbax.checkpoint as ocp

    items = {"params": ocp.args.StandardRestore(_abstract(params_like, params_shardings)),
             "meta": ocp.args.JsonRestore()}
    if opt_like is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_like, opt_shardings))
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["params"], restored.get("opt_state") if opt_like is not None else None, restored["meta"]


def load_run(run_dir: str, step: int | None = None, mesh=None, merge: bool = False, root: str | None = None,
             merge_base: str = "full", **implementation):
    """The run's model with its trained weights of `step` (default: the latest checkpoint); `implementation`
    overrides model fields that do not change the weights (moe_backend, scan_layers, ...). With `merge`, the
    adapters are folded into the base and removed: the full-precision base, as Chinese-Mixtral's release
    merged them, or with `merge_base="nf4"` the dequantised NF4 base the run trained on. `root` replaces
    the model at the bottom of a chain of runs (see `build_model`)."""
    run_model = read_manifest(run_dir)
    run_model = dataclasses.replace(run_model, implementation={**run_model.implementation, **implementation})
    if merge and merge_base == "full":
        run_model = dataclasses.replace(run_model, quantize="none")
    manager = open_manager(run_dir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"{os.path.join(run_dir, CHECKPOINTS)}: no checkpoint"
                                  f"{'' if step is None else f' for step {step}'} (steps: {list(manager.all_steps())})")
        model = build_model(run_model, mesh, root)
        graphdef, params, frozen = nnx.split(model, run_model.trainable(), ...)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        params, _, _ = restore(manager, step, params, shardings)
    finally:
        manager.close()
    model = nnx.merge(graphdef, params, frozen)
    return merge_adapters(model) if merge and run_model.lora is not None else model
