"""kernels.py: what "auto" picks on each kind of device (devices faked where this CPU has none)."""
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from mixtral_jax.kernels import select as kernels

H100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", compute_capability="9.0")
A100 = SimpleNamespace(platform="gpu", device_kind="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
MI300 = SimpleNamespace(platform="gpu", device_kind="AMD Instinct MI300X")
TPU = SimpleNamespace(platform="tpu", device_kind="TPU v5p")


def test_this_cpu_gets_the_blocked_product_and_xla_attention():
    assert kernels.grouped_matmul_kind("auto") == "blocked"
    assert kernels.attention_implementation("auto", jnp.bfloat16) == "xla"


@pytest.mark.parametrize("device, product, bf16_attention", [
    (H100, "mosaic_gpu", "cudnn"), (A100, "ragged_dot", "cudnn"), (MI300, "ragged_dot", "xla"),
    (TPU, "ragged_dot", "xla")])
def test_auto_by_device(monkeypatch, device, product, bf16_attention):
    monkeypatch.setattr(kernels, "default_device", lambda: device)
    assert kernels.grouped_matmul_kind("auto") == product
    assert kernels.attention_implementation("auto", jnp.bfloat16) == bf16_attention
    assert kernels.attention_implementation("auto", jnp.float32) == "xla"  # cuDNN's fused attention: 16-bit only


def test_an_explicit_choice_is_kept(monkeypatch):
    monkeypatch.setattr(kernels, "default_device", lambda: H100)
    assert kernels.grouped_matmul_kind("blocked") == "blocked"
    assert kernels.attention_implementation("xla", jnp.bfloat16) == "xla"
