"""`convert orbax-to-hf`: an Orbax model checkpoint, or a training run (its adapters merged), written as an
HF directory in the legacy layout, one layer-tensor (or one expert's matrix) at a time through
`hf_files.write_pretrained`. An Orbax checkpoint is read on the host without JAX; a run's model is loaded
into memory (JAX) and merged there."""

from __future__ import annotations

import os
from typing import Any

from mixtral_jax.checkpoints import run_manifest
from mixtral_jax.checkpoints.hf_files import write_pretrained
from mixtral_jax.checkpoints.kinds import ORBAX, RUN, checkpoint_kind
from mixtral_jax.checkpoints.orbax_format import OrbaxSource
from mixtral_jax.checkpoints.sources import ModelSource
from mixtral_jax.config import canonical_dtype
from mixtral_jax.errors import CheckpointError


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Before a run's model is loaded (minutes at 8x7B), not after: write_pretrained checks again."""
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")


def merged_run_model(run_dir: str, base: str | None = None, merge_base: str = "full"):
    """A run's model with its adapters folded in (W + B A * alpha / r in fp32, then cast), and the directory
    of the model at the bottom of its chain of runs: the recorded one, or `base` (an HF directory) in its
    place. `merge_base` "nf4" merges onto the dequantised NF4 base the run trained on, "full" (default) onto
    the full-precision base. The whole model is in memory."""
    from mixtral_jax.checkpoints.pretrained import load_run  # the model in memory: JAX

    model = load_run(run_dir, merge=True, root=base and os.path.abspath(base), merge_base=merge_base)
    return model, os.path.abspath(base) if base else run_manifest.root_base(run_dir)


def orbax_to_hf(src: str, out: str, dtype: Any = None, max_shard_bytes: int | None = 5 * 10**9,
                merge: bool = False, base: str | None = None, merge_base: str = "full", overwrite: bool = False,
                show_progress: bool = True) -> None:
    """`dtype` None keeps the stored dtype (else a name, a short form such as "bf16", or a dtype object);
    `max_shard_bytes` None writes one file. `merge`, `base` and `merge_base` apply to a LoRA training run (see
    `merged_run_model`)."""
    if dtype is not None:
        dtype = canonical_dtype(dtype, "orbax_to_hf: argument 'dtype'")
    _refuse_existing(out, overwrite)
    kind = checkpoint_kind(src)
    if kind == ORBAX:
        if merge or base is not None:
            raise CheckpointError(f"{src}: an Orbax model checkpoint has no adapters; --merge and --base apply "
                                  f"to training run directories")
        source = OrbaxSource(src)
    else:
        if kind != RUN:
            raise CheckpointError(f"{src}: neither an Orbax model checkpoint (no orbax_model.json) nor a "
                                  f"training run directory (no {run_manifest.MANIFEST})")
        run_model = run_manifest.read_manifest(src)
        if run_model.lora is not None and not merge:
            raise CheckpointError(f"{src}: a LoRA training run; pass --merge to fold its adapters into the "
                                  f"base weights, or write the adapters alone with `mixtral-jax convert "
                                  f"export-peft {src} OUT`")
        model, base_dir = merged_run_model(src, base, merge_base)
        source = ModelSource(model, base_dir if os.path.isdir(base_dir) else None)
    write_pretrained(source.config, source.read, out, max_shard_bytes=max_shard_bytes,
                     dtype=dtype, overwrite=overwrite,
                     extra_files=source.extra_files(), show_progress=show_progress, read_part=source.read_part,
                     read_ahead=2 if isinstance(source, OrbaxSource) else 1)


__all__ = ["merged_run_model", "orbax_to_hf"]
