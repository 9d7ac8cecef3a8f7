"""What a model path holds, decided in one place for the loader, the converters and `verify`: a training run
directory (its manifest), an Orbax model checkpoint (its marker) or else an HF directory. No JAX."""

from __future__ import annotations

import os

from mixtral_jax.checkpoints.orbax_format import is_orbax_model
from mixtral_jax.checkpoints.run_manifest import is_run_dir

RUN, ORBAX, HF = "run", "orbax", "hf"


def checkpoint_kind(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if is_run_dir(path):
        return RUN
    if is_orbax_model(path):
        return ORBAX
    return HF


__all__ = ["HF", "ORBAX", "RUN", "checkpoint_kind"]
