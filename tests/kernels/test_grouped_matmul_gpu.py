"""gmm_gpu's wiring on the CPU: the Hopper kernels replaced by fakes that check the real kernels' input rules
and compute the reference products, so the product, its gradients, the fallback and the unwritten rows past
the last group are tested here; `bench/bench_gpu_kernels.py` runs the real kernels against ragged_dot on a GPU."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import grouped_matmul_gpu as gmm_gpu
from mixtral_jax.kernels import select as kernels
from tests.helpers.grouped_products import (
    moe_block_against_blocked,
    problem,
    reference_transposed,
    value_and_grads,
)

GARBAGE = 1e4  # what a fake kernel leaves in rows no group covers, as the real one leaves them unwritten


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []

    def ragged(lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n,
               transpose_rhs=False):
        assert lhs.dtype == rhs.dtype and group_sizes.dtype == jnp.int32
        k, n = lhs.shape[1], rhs.shape[1] if transpose_rhs else rhs.shape[2]
        assert k % block_k == 0 and n % (block_n * grid_block_n) == 0
        calls.append("ragged_T" if transpose_rhs else "ragged")
        weights = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        out = jax.lax.ragged_dot(lhs, weights, group_sizes, preferred_element_type=jnp.float32)
        covered = jnp.arange(lhs.shape[0])[:, None] < jnp.sum(group_sizes)
        return jnp.where(covered, out, GARBAGE).astype(lhs.dtype)

    def transposed(lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n):
        assert lhs.dtype == rhs.dtype
        assert lhs.shape[1] % block_m == 0 and rhs.shape[1] % block_n == 0
        calls.append("transposed")
        return reference_transposed(lhs, rhs, group_sizes).astype(lhs.dtype)

    monkeypatch.setattr(gmm_gpu, "_ragged_kernel", ragged)
    monkeypatch.setattr(gmm_gpu, "_transposed_kernel", transposed)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("dtype, kernels", [(jnp.bfloat16, ["ragged", "ragged_T", "transposed"]),
                                            (jnp.float32, [])])
def test_product_and_gradients_equal_ragged_dot(kernel_calls, dtype, kernels):
    rows, weights, sizes, cotangent = problem(dtype)
    ours = value_and_grads(gmm_gpu.grouped_matmul, rows, weights, sizes, cotangent)
    reference = value_and_grads(jax.lax.ragged_dot, rows, weights, sizes, cotangent)
    assert sorted(kernel_calls) == sorted(kernels)
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for name, a, b in zip(("product", "d_rows", "d_weights"), ours, reference):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=name)
    assert not np.any(ours[0][int(sizes.sum()):]) and not np.any(ours[1][int(sizes.sum()):])


@pytest.mark.slow
def test_shapes_the_tiles_do_not_take_fall_back_to_ragged_dot(kernel_calls):
    """A LoRA rank of 32: x A has 32 output columns, (x A) B contracts over 32, and so do their gradients;
    every product falls back (the fakes would fail on a shape the real kernels refuse) with the same values."""
    rows, a, sizes, cotangent = problem(jnp.bfloat16, n=32)
    b = jax.random.normal(jax.random.key(1), (4, 32, 128), jnp.bfloat16)
    for lhs, weights, out_grad in ((rows, a, cotangent), (rows[:, :32], b, jnp.ones((40, 128), jnp.bfloat16))):
        ours = value_and_grads(gmm_gpu.grouped_matmul, lhs, weights, sizes, out_grad)
        reference = value_and_grads(jax.lax.ragged_dot, lhs, weights, sizes, out_grad)
        for a_, b_ in zip(ours, reference):
            np.testing.assert_allclose(a_, b_, rtol=2e-2, atol=2e-2 * np.abs(b_).max())
    assert kernel_calls == []


@pytest.mark.slow
def test_the_moe_block_on_the_kernels_equals_the_blocked_backend(kernel_calls, monkeypatch):
    """grouped_matmul="auto" on a Hopper GPU (faked) takes the kernels."""
    monkeypatch.setattr(kernels, "default_device", lambda: SimpleNamespace(
        platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0"))
    ours, blocked = moe_block_against_blocked("auto", intermediate=192)
    assert kernel_calls.count("ragged") == 3
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(blocked, np.float32), rtol=2e-2, atol=2e-2)
