"""Which kernels `grouped_matmul`, `attention_implementation` and `expert_exchange` "auto" pick, from the
default device.

A config that runs on a laptop's CPU, a TPU pod and an H100 should not need editing for each: the blocked
grouped product is the fast one on CPU (ragged_dot there computes every group densely), JAX's megablox kernel
on TPU (the one MaxText runs; a grouped-matmul kernel beats XLA's ragged_dot's MFU there), JAX's Mosaic GPU
kernels on Hopper (XLA's GPU ragged_dot is dense too); cuDNN's fused attention wherever an NVIDIA GPU runs
bf16/fp16, splash attention on TPU (MaxText's).
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
    if device.platform == "tpu":
        return "megablox"
    if _nvidia(device) and str(getattr(device, "compute_capability", "")).startswith("9."):
        return "mosaic_gpu"
    return "ragged_dot"


def attention_implementation(requested: str, dtype) -> str:
    if requested != "auto":
        return requested
    device = default_device()
    if device.platform == "tpu":
        return "splash"
    return "cudnn" if _nvidia(device) and jnp.dtype(dtype) in _CUDNN_DTYPES else "xla"


def expert_exchange_kind(requested: str, platform: str | None = None) -> str:
    """The ragged all-to-all moves only real rows, but XLA's CPU backend has none: fixed buffers there.
    `platform` (default: the default device's) lets `plan` ask what a TPU would run."""
    if requested != "auto":
        return requested
    return "padded" if (platform or default_device().platform) == "cpu" else "ragged"
