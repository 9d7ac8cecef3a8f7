"""Randomly initialised models written as HF directories: the bundled tiny model and benchmark models."""

from __future__ import annotations

from typing import Any

from flax import nnx

from mixtral_jax.checkpoints.hf_model import save_pretrained
from mixtral_jax.config import MixtralConfig, canonical_dtype, parse_overrides
from mixtral_jax.model.transformer import Mixtral


def init_random(out: str, preset: str, seed: int = 0, dtype: Any = "float32", overrides: list[str] = (),
                overwrite: bool = False) -> str:
    """Initialises in fp32 from `seed` (normal(0.02) weights, unit norms), then writes in `dtype` (a name, a
    short form such as "bf16", or a dtype object)."""
    dtype = canonical_dtype(dtype, "init_random: argument 'dtype'")  # before the model is built
    config = MixtralConfig.from_preset(preset, {**parse_overrides(list(overrides)), "dtype": "float32",
                                                "param_dtype": "float32"})
    model = Mixtral(config, rngs=nnx.Rngs(seed))
    save_pretrained(model, out, dtype=dtype, overwrite=overwrite)
    return out
