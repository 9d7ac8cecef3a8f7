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
    assert kernels.expert_exchange_kind("auto") == "padded"  # XLA's CPU backend has no ragged all-to-all


@pytest.mark.parametrize("device, product, bf16_attention, fp32_attention, exchange", [
    (H100, "mosaic_gpu", "cudnn", "xla", "ragged"), (A100, "ragged_dot", "cudnn", "xla", "ragged"),
    (MI300, "ragged_dot", "xla", "xla", "ragged"), (TPU, "megablox", "splash", "splash", "ragged")])
def test_auto_by_device(monkeypatch, device, product, bf16_attention, fp32_attention, exchange):
    monkeypatch.setattr(kernels, "default_device", lambda: device)
    assert kernels.grouped_matmul_kind("auto") == product
    assert kernels.attention_implementation("auto", jnp.bfloat16) == bf16_attention
    assert kernels.attention_implementation("auto", jnp.float32) == fp32_attention  # cuDNN's: 16-bit only
    assert kernels.expert_exchange_kind("auto") == exchange


def test_an_explicit_choice_is_kept(monkeypatch):
    monkeypatch.setattr(kernels, "default_device", lambda: H100)
    assert kernels.grouped_matmul_kind("blocked") == "blocked"
    assert kernels.attention_implementation("xla", jnp.bfloat16) == "xla"
