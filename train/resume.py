"""The run directory's binding to its model and config, and what a resume may change.

A run directory without a checkpoint is bound to nothing: a start that failed before its first checkpoint
(a bad mesh, bad data) leaves model.json and config.yaml behind, and the corrected retry replaces them
whatever it changed. Once a checkpoint exists, a resume compares the new config with the run's config.yaml
(and its model.json) key by key:

- FIXED keys (the adapters' shapes: lora.enabled, lora.rank, lora.targets, lora.modules_to_save) cannot
  change: the checkpoints hold arrays of the old shapes;
- GUARDED keys break an exact resume (the data, its order and batches, the schedule, the loss, the optimizer,
  the model): seed, steps, epochs, batch_size, micro_batches, aux_loss_coef, model.*, lora.*, data.* (but
  data.eval and data.eval_rows, which only decide the held-out scores), optimizer.*. A change of one is
  refused unless `resume.allow_changes` lists it (or its section as `optimizer.*`);
- the others (save_every, log_every, mesh, stop_at_step, keep_checkpoints, ...) change freely.

A refusal lists every offending key with its old and new value ("lora.rank: 64 -> 8"). Every accepted change
is appended to RUN_DIR/changes.jsonl (time, the step resumed from, key, old, new, whether allow_changes was
needed) before config.yaml and model.json are rewritten. run_dir and resume.* are not compared; a key the old
config.yaml lacks (added by a later version) is not a change.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time

import yaml

from mixtral_jax.checkpoints import run_manifest as runs
from mixtral_jax.errors import ConfigError
from mixtral_jax.io import paths
from train.config import TrainConfig

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "changes.jsonl"
FIXED = ("lora.enabled", "lora.rank", "lora.targets", "lora.modules_to_save")
GUARDED = ("seed", "steps", "epochs", "batch_size", "micro_batches", "aux_loss_coef", "model.*", "lora.*",
           "data.*", "optimizer.*")
FREE = ("data.eval", "data.eval_rows")
NOT_COMPARED = ("run_dir", "resume.*")
SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.default_factory))
# model.json's fields as the config keys they come from
MANIFEST_KEYS = {"base": "model.path", "dtype": "model.dtype", "quantize": "model.quantize",
                 "modules_to_save": "lora.modules_to_save", "implementation": "model.implementation",
                 "lora_seed": "seed"}


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def flat_config(values: dict) -> dict:
    """Dotted keys of a config's dict (sections one level deep; a mapping value such as model.implementation
    stays one value)."""
    flat = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def _manifest_changes(old: runs.RunModel, new: runs.RunModel) -> dict[str, tuple]:
    """model.json's differences as config keys -> (old, new)."""
    changes = {}
    for field in dataclasses.fields(runs.RunModel):
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before == after:
            continue
        if field.name == "lora":
            if before is None or after is None:
                changes["lora.enabled"] = (before is not None, after is not None)
                continue
            changes.update({f"lora.{k}": (before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
                            if before.get(k) != after.get(k)})
        else:
            changes[MANIFEST_KEYS[field.name]] = (before, after)
    return changes


def config_changes(run_dir: str, config: TrainConfig, run_model: runs.RunModel) -> dict[str, tuple]:
    """Every key whose value differs from the run directory's config.yaml or model.json -> (old, new)."""
    changes = {}
    if runs.is_run_dir(run_dir):
        changes.update(_manifest_changes(runs.read_manifest(run_dir), run_model))
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if paths.as_path(config_path).is_file():
        try:
            old = yaml.safe_load(paths.as_path(config_path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{config_path}: not valid YAML ({err})") from None
        before, after = flat_config(old if isinstance(old, dict) else {}), flat_config(config.to_dict())
        changes.update({key: (before[key], value) for key, value in after.items()
                        if key in before and before[key] != value})
    return {key: change for key, change in sorted(changes.items()) if not _matches(key, NOT_COMPARED)}


def _check_allowed_keys(config: TrainConfig) -> None:
    known = set(flat_config(config.to_dict()))
    for pattern in config.resume.allow_changes:
        if not any(fnmatch.fnmatchcase(key, pattern) for key in known):
            raise ConfigError(f"key 'resume.allow_changes': '{pattern}' names no config key (keys: "
                              f"`mixtral-jax train --keys`; a section as 'optimizer.*')")


def _text(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)


def check_changes(run_dir: str, step: int, changes: dict[str, tuple], allowed) -> None:
    """Refuses the changes a resume cannot take, naming each key with its old and new value."""
    fixed = [key for key in changes if _matches(key, FIXED)]
    guarded = [key for key in changes if key not in fixed and _matches(key, GUARDED) and not _matches(key, FREE)
               and not _matches(key, allowed)]
    if not fixed and not guarded:
        return
    parts = []
    if fixed:
        parts.append(f"{'; '.join(f'{k}: {_text(changes[k][0])} -> {_text(changes[k][1])}' for k in fixed)} "
                     f"(cannot change: the checkpoints hold the old shapes; use a new run_dir)")
    if guarded:
        parts.append(f"{'; '.join(f'{k}: {_text(changes[k][0])} -> {_text(changes[k][1])}' for k in guarded)} "
                     f"(breaks exact resume; allow with resume.allow_changes=[{','.join(guarded)}])")
    raise ConfigError(f"{run_dir}: cannot resume from step {step} with this config: {'; '.join(parts)}")


def record_changes(run_dir: str, step: int, changes: dict[str, tuple], allowed) -> None:
    """Appends one JSON line per accepted change to RUN_DIR/changes.jsonl."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def guarded(key: str) -> bool:
        return _matches(key, GUARDED) and not _matches(key, FREE)

    lines = "".join(json.dumps({"time": now, "step": step, "key": key, "old": old, "new": new,
                                "via_allow_changes": guarded(key) and _matches(key, allowed)},
                               ensure_ascii=False) + "\n" for key, (old, new) in changes.items())
    path = os.path.join(run_dir, CHANGES_FILE)
    if paths.is_remote(path):  # an object store cannot append: the whole file again
        previous = paths.as_path(path).read_text() if paths.as_path(path).exists() else ""
        paths.write_text(path, previous + lines)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)


def prepare_run_dir(config: TrainConfig, run_model: runs.RunModel, steps: list[int], writer: bool, log) -> None:
    """Checks the config against a run directory with checkpoints (`steps`), records what changed, and writes
    the resolved config and the model manifest (process 0: `writer`)."""
    run_dir = config.run_dir
    _check_allowed_keys(config)
    if steps:
        changes = config_changes(run_dir, config, run_model)
        check_changes(run_dir, steps[-1], changes, config.resume.allow_changes)
        if changes:
            log(f"{run_dir}: resuming with changed keys "
                f"{', '.join(f'{k}: {_text(old)} -> {_text(new)}' for k, (old, new) in changes.items())} "
                f"(recorded in {CHANGES_FILE})")
            if writer:
                record_changes(run_dir, steps[-1], changes, config.resume.allow_changes)
    elif runs.is_run_dir(run_dir) and runs.read_manifest(run_dir) != run_model:
        log(f"{run_dir}: replacing {runs.MANIFEST} and {CONFIG_FILE} (no checkpoint yet: nothing is bound to them)")
    if writer:
        runs.write_manifest(run_dir, run_model)
        paths.write_text(os.path.join(run_dir, CONFIG_FILE),
                         yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def make_run_dir(run_dir: str) -> None:
    if not paths.is_remote(run_dir):  # an object store has no directories to make
        os.makedirs(run_dir, exist_ok=True)


__all__ = ["CHANGES_FILE", "CONFIG_FILE", "FIXED", "FREE", "GUARDED", "check_changes", "config_changes",
           "flat_config", "make_run_dir", "prepare_run_dir", "record_changes"]
