"""A training run directory's manifest, `model.json`: what the trained model is (the base it references,
dtype, NF4 or not, the LoRA settings, which weights are trained in full). Its checkpoints are
run_state.py's; this part needs no JAX, so telling a run directory from a model directory (the converters,
`verify`) does not import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

from mixtral_jax.config import read_json_object
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io import paths

if TYPE_CHECKING:
    from mixtral_jax.model.lora import LoraConfig

MANIFEST = "model.json"
CHECKPOINTS = "checkpoints"
BUNDLED_TINY = "bundled:tiny"


@dataclasses.dataclass(frozen=True)
class RunModel:
    """Everything needed to rebuild a run's model before its trained weights are restored into it."""

    base: str                                   # HF directory, or bundled:tiny
    dtype: str = "bfloat16"
    quantize: str = "none"                      # none | nf4 (NF4, double-quantised unless stored plain)
    lora: dict | None = None                    # LoraConfig fields; None: full fine-tuning
    modules_to_save: tuple[str, ...] = ()       # trained in full beside the adapters
    implementation: dict = dataclasses.field(default_factory=dict)
    lora_seed: int = 0

    def lora_config(self) -> LoraConfig | None:
        from mixtral_jax.model.lora import (
            LoraConfig,  # the bridges to the model import JAX when they are used
        )

        return None if self.lora is None else LoraConfig(**self.lora)

    def trainable(self):
        """The nnx filter of the trained weights: everything, or the adapters plus modules_to_save."""
        from flax import nnx

        from mixtral_jax.model.lora import LoRAParam

        if self.lora is None:
            return nnx.Param
        return nnx.Any(LoRAParam, *(nnx.PathContains(name) for name in self.modules_to_save))


def base_path(spec: str) -> str:
    if spec == BUNDLED_TINY:
        from mixtral_jax.assets import TINY_MODEL_DIR

        return TINY_MODEL_DIR
    return spec


def root_base(run_dir: str) -> str:
    """The model at the bottom of a chain of runs (the HF or Orbax directory the first run started from)."""
    base = base_path(read_manifest(run_dir).base)
    return root_base(base) if is_run_dir(base) else base


def model_directory(path: str | None) -> str | None:
    """The model directory behind a path: itself, or for a training run the model its chain of runs started
    from (whose tokenizer files the run uses)."""
    return root_base(path) if path is not None and is_run_dir(path) else path


def write_manifest(run_dir: str, run_model: RunModel) -> None:
    paths.write_text(os.path.join(run_dir, MANIFEST), json.dumps(dataclasses.asdict(run_model), indent=2) + "\n")


def read_manifest(run_dir: str) -> RunModel:
    path = os.path.join(run_dir, MANIFEST)
    if not paths.as_path(path).is_file():
        raise CheckpointError(f"{run_dir}: not a training run (no {MANIFEST})")
    values = read_json_object(path, CheckpointError)
    fields = {f.name for f in dataclasses.fields(RunModel)}
    unknown = sorted(set(values) - fields)
    if unknown or "base" not in values:
        raise CheckpointError(f"{path}: field '{unknown[0] if unknown else 'base'}' "
                              f"{'is unknown' if unknown else 'is missing'}")
    values["modules_to_save"] = tuple(values.get("modules_to_save", ()))
    return RunModel(**values)


def is_run_dir(path: str) -> bool:
    return paths.as_path(os.path.join(path, MANIFEST)).is_file()


__all__ = ["BUNDLED_TINY", "CHECKPOINTS", "MANIFEST", "RunModel", "base_path", "is_run_dir", "model_directory",
           "read_manifest", "root_base", "write_manifest"]
