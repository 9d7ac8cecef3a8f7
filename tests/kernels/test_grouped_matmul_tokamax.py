"""gmm_tokamax on the CPU: tokamax's XLA path against jax.lax.ragged_dot, and its Hopper path's wiring with
tokamax's sm90 kernels replaced by fakes that check the real kernels' input rules and leave NaN in the rows
no group covers (the real ones leave them unwritten); `bench/bench_gpu_kernels.py --tokamax` runs the real
kernels against gmm_gpu on a GPU."""
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.errors import ConfigError
from mixtral_jax.kernels import grouped_matmul_tokamax as gmm_tokamax
from mixtral_jax.kernels import select as kernels
from tests.helpers.grouped_products import (
    moe_block_against_blocked,
    problem,
    reference_transposed,
    value_and_grads,
)

pytest.importorskip("tokamax")

H200 = SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0")


@pytest.fixture
def hopper(monkeypatch):
    """An H200 as select and tokamax see the device, its sm90 kernels faked; -> the kernels called."""
    from tokamax._src import gpu_utils
    from tokamax._src.ops.ragged_dot import pallas_mosaic_gpu_kernel_sm90 as sm90

    calls = []

    def ragged(lhs, rhs, group_sizes, out_dtype, config, activation=None):
        k = lhs.shape[1]
        assert lhs.dtype == rhs.dtype == jnp.bfloat16 and activation is None and k % min(k, config.block_k) == 0
        calls.append("ragged")
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32).astype(out_dtype)
        return jnp.where(jnp.arange(lhs.shape[0])[:, None] < jnp.sum(group_sizes), out, jnp.nan)

    def contracting(lhs, rhs, group_sizes, out_dtype, config, activation=None):
        assert lhs.dtype == rhs.dtype == jnp.bfloat16 and activation is None
        calls.append("contracting")
        return reference_transposed(lhs, rhs, group_sizes).astype(out_dtype)

    monkeypatch.setattr(sm90, "ragged_dot_kernel", ragged)
    monkeypatch.setattr(sm90, "ragged_contracting_dim_dot_kernel", contracting)
    monkeypatch.setattr(gpu_utils, "is_sm90", lambda device=None: True)
    monkeypatch.setattr(gpu_utils, "has_mosaic_gpu_support", lambda device=None: True)
    monkeypatch.setattr(kernels, "default_device", lambda: H200)
    return calls


def _check(rows, weights, sizes, cotangent, tolerance):
    """Product and gradients equal ragged_dot's; the rows past the groups are zero in the product and d_rows."""
    ours = value_and_grads(gmm_tokamax.grouped_matmul, rows, weights, sizes, cotangent)
    reference = value_and_grads(jax.lax.ragged_dot, rows, weights, sizes, cotangent)
    for name, a, b in zip(("product", "d_rows", "d_weights"), ours, reference):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=name)
    assert not np.any(ours[0][int(sizes.sum()):]) and not np.any(ours[1][int(sizes.sum()):])


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_the_cpu_takes_the_xla_path_equal_to_ragged_dot(dtype, tolerance):
    rows, weights, sizes, cotangent = problem(dtype)
    assert gmm_tokamax.implementation(rows, weights) == "xla"
    _check(rows, weights, sizes, cotangent, tolerance)


def test_hopper_takes_the_kernels_for_product_and_both_gradients(hopper):
    rows, weights, sizes, cotangent = problem(jnp.bfloat16, n=256)
    assert gmm_tokamax.implementation(rows, weights) == "mosaic_gpu"
    _check(rows, weights, sizes, cotangent, 2e-2)
    assert sorted(hopper) == ["contracting", "ragged", "ragged"]


@pytest.mark.parametrize("dtype, n", [(jnp.float32, 256), (jnp.bfloat16, 192), (jnp.bfloat16, 32)])
def test_products_the_kernels_do_not_take_go_to_xla_on_hopper(hopper, dtype, n):
    """fp32; 192 columns (whole blocks of 128 only); a LoRA rank of 32."""
    rows, weights, sizes, cotangent = problem(dtype, n=n)
    assert gmm_tokamax.implementation(rows, weights) == "xla"
    _check(rows, weights, sizes, cotangent, 1e-6 if dtype == jnp.float32 else 2e-2)
    assert hopper == []


def test_the_moe_block_on_tokamax_equals_the_blocked_backend(hopper):
    ours, blocked = moe_block_against_blocked("tokamax", intermediate=256)
    assert hopper == ["ragged"] * 3
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(blocked, np.float32), rtol=2e-2, atol=2e-2)


def test_without_tokamax_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)
    rows, weights, sizes, _ = problem(jnp.float32)
    with pytest.raises(ConfigError, match=r"mixtral-jax\[gpu\]"):
        gmm_tokamax.grouped_matmul(rows, weights, sizes)
