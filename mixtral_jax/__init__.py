"""mixtral-jax: a JAX/Flax port of the Chinese-Mixtral language adaptation (QLoRA on a sparse-MoE Mixtral).

The names below are imported on first use, so that importing one module of the package (a converter, the
command line) does not import JAX and Flax (~1 s) unless it needs them.
"""

import importlib

_EXPORTS = {"CheckpointError": "errors", "ConfigError": "errors", "KVCache": "model.transformer",
            "Mixtral": "model.transformer", "MixtralConfig": "config", "MixtralOutput": "model.transformer",
            "from_pretrained": "checkpoints.pretrained", "generate": "model.generation",
            "load_balancing_loss": "model.transformer", "quantize_nf4": "quantization.nf4",
            "dequantize_nf4": "quantization.nf4", "save_pretrained": "checkpoints.hf_model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mixtral_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mixtral_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
