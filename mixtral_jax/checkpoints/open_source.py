"""`open_source`: a host-side reader (sources.py) of any model path, for the converters and `verify`. HF
directories and Orbax model checkpoints are read without JAX; a training run's model is loaded into memory
(JAX, imported then) with its adapters merged."""

from __future__ import annotations

import os

from mixtral_jax.checkpoints.kinds import ORBAX, RUN, checkpoint_kind
from mixtral_jax.checkpoints.orbax_format import OrbaxSource
from mixtral_jax.checkpoints.run_manifest import root_base
from mixtral_jax.checkpoints.sources import HFSource, ModelSource


def open_source(path: str | os.PathLike, dtype: str | None = None):
    path = os.fspath(path)
    kind = checkpoint_kind(path)
    if kind == ORBAX:
        return OrbaxSource(path)
    if kind == RUN:
        from mixtral_jax.checkpoints.pretrained import load_run

        base = root_base(path)
        return ModelSource(load_run(path, merge=True), base if os.path.isdir(base) else None)
    return HFSource(path, dtype)


__all__ = ["open_source"]
