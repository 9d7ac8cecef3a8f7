"""Training-run checkpoints: the run directory's layout, shared by the trainer (which writes it) and
`pretrained.load_run` (which rebuilds the run's model from them); the manifest, model.json, is
run_manifest.py's.

    RUN_DIR/model.json               what the trained model is: the base it references (never copied), dtype,
                                     NF4 or not, the LoRA settings, which weights are trained in full
    RUN_DIR/checkpoints/STEP/        Orbax: `params` (trainable weights only), `opt_state`, `meta` (JSON:
                                     step, data position, RNG, ...)

RUN_DIR may be a gs:// URL (mixtral_jax/io/paths.py). Orbax's CheckpointManager commits each step atomically
(a step directory appears only when complete), keeps `max_to_keep` and saves asynchronously; restoring
takes abstract arrays with shardings, so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax

from mixtral_jax.checkpoints.run_manifest import CHECKPOINTS
from mixtral_jax.io import paths

if TYPE_CHECKING:
    import orbax.checkpoint as ocp


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


__all__ = ["open_manager", "restore", "save"]
