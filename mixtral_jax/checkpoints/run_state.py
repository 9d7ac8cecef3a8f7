"""Training-run checkpoints: the run directory's layout, shared by the trainer (which writes it) and
`pretrained.load_run` (which rebuilds the run's model from them); the manifest, model.json, is
run_manifest.py's and the trainer's lock run_lock.py's.

    RUN_DIR/model.json               what the trained model is: the base it references (never copied), dtype,
                                     NF4 or not, the LoRA settings, which weights are trained in full
    RUN_DIR/checkpoints/STEP/        Orbax: `params` (trainable weights only), `opt_state`, `meta` (JSON:
                                     step, data position, RNG, ...)
    RUN_DIR/checkpoints/STEP.damaged-TIME/   a checkpoint that could not be restored, moved aside by the
                                     trainer (kept, never deleted; Orbax lists only step-numbered names)

RUN_DIR may be a gs:// URL (mixtral_jax/io/paths.py). Orbax's CheckpointManager commits each step atomically
(a step directory appears only when complete), keeps `max_to_keep` and saves asynchronously; restoring
takes abstract arrays with shardings, so a checkpoint written on one mesh restores onto another. A step
whose files were deleted or damaged afterwards fails to restore with a CheckpointError naming it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import jax

from mixtral_jax.checkpoints.run_manifest import CHECKPOINTS
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io import paths

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

DAMAGED = ".damaged-"  # checkpoints/STEP.damaged-TIME: moved aside, not a step Orbax lists


def open_manager(run_dir: str, max_to_keep: int | None = None, async_save: bool = True) -> ocp.CheckpointManager:
    import orbax.checkpoint as ocp  # imported when used: from_pretrained of an HF directory never needs it

    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    directory = paths.as_path(os.path.join(run_dir, CHECKPOINTS))
    return ocp.CheckpointManager(directory if paths.is_remote(run_dir) else directory.resolve(), options=options)


def saved_steps(run_dir: str) -> list[int]:
    """The run's committed checkpoint steps, oldest first; none (and nothing created) without a
    checkpoints directory."""
    if not paths.as_path(os.path.join(run_dir, CHECKPOINTS)).exists():
        return []
    manager = open_manager(run_dir, async_save=False)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def step_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS, str(step))


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict[str, Any]) -> None:
    """Starts writing a step (in the background when the manager is asynchronous)."""
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                               opt_state=ocp.args.StandardSave(opt_state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def failure_reason(err: BaseException) -> str:
    """One line of an exception (Orbax and TensorStore raise pages): its type and first non-empty line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}" if text else type(err).__name__


def restore(manager: ocp.CheckpointManager, step: int, params_like, params_shardings, opt_like=None,
            opt_shardings=None):
    """(params, opt_state or None, meta) of `step`, placed with the given shardings (any mesh). A step that
    cannot be restored (files deleted or truncated, ...) raises a CheckpointError naming its directory."""
    import orbax.checkpoint as ocp

    items = {"params": ocp.args.StandardRestore(_abstract(params_like, params_shardings)),
             "meta": ocp.args.JsonRestore()}
    if opt_like is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_like, opt_shardings))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        if not isinstance(restored["meta"], dict):
            raise ValueError(f"meta is {type(restored['meta']).__name__}, not a JSON object")
    except Exception as err:  # noqa: BLE001 - Orbax and TensorStore raise many kinds; one message names the step
        where = os.path.join(os.fspath(manager.directory), str(step))
        raise CheckpointError(f"{where}: the checkpoint of step {step} cannot be restored "
                              f"({failure_reason(err)})") from err
    return restored["params"], restored.get("opt_state") if opt_like is not None else None, restored["meta"]


def move_aside(run_dir: str, step: int) -> str:
    """Renames checkpoints/STEP to checkpoints/STEP.damaged-TIME (UTC), kept for inspection; Orbax no longer
    lists it. Returns the new path."""
    directory = paths.as_path(os.path.join(run_dir, CHECKPOINTS))
    target = directory / f"{step}{DAMAGED}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    (directory / str(step)).rename(target)
    return os.path.join(run_dir, CHECKPOINTS, target.name)


__all__ = ["DAMAGED", "failure_reason", "move_aside", "open_manager", "restore", "save", "saved_steps",
           "step_path"]
