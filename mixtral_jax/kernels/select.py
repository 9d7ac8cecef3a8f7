"""Which kernels `grouped_matmul="auto"` and `attention_implementation="auto"` pick, from the default device.

A config that runs on a laptop's CPU, a TPU pod and an H100 should not need editing for each: the blocked
grouped product is the fast one on CPU (ragged_dot there computes every group densely), XLA's ragged_dot on
TPU (it lowers to a grouped product there), JAX's Mosaic GPU kernels on Hopper (XLA's GPU ragged_dot is dense
too); cuDNN's fused attention wherever an NVIDIA GPU runs bf16/fp16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def default_device():
    return jax.devices()[0]


def _nvidia(device) -> bool:
    return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


def grouped_matmul_kind(requested: str) -> str:
    if requested != "auto":
        return requested
    device = default_device()
    if device.platform == "cpu":
        return "blocked"
    if _nvidia(device) and str(getattr(device, "compute_capability", "")).startswith("9."):
        return "mosaic_gpu"
    return "ragged_dot"


def attention_implementation(requested: str, dtype) -> str:
    if requested != "auto":
        return requested
    return "cudnn" if _nvidia(default_device()) and jnp.dtype(dtype) in _CUDNN_DTYPES else "xla"
