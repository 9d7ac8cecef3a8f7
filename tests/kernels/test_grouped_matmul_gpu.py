"""gmm_gpu's wiring on the CPU: the Hopper kernels replaced by fakes that check the real kernels' input rules
and compute the reference products, so the product, its gradients, the fallback and the unwritten rows past
the last group are tested here; `bench/bench_gpu_kernels.py` runs the real kernels against ragged_dot on a GPU."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.config import MixtralConfig
from mixtral_jax.kernels import grouped_matmul_gpu as gmm_gpu
from mixtral_jax.kernels import select as kernels
from mixtral_jax.model.moe import dropless_experts, route

GARBAGE = 1e4  # what a fake kernel leaves in rows no group covers, as the real one leaves them unwritten


def _reference_transposed(lhs, rhs, group_sizes):
    numbers = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, numbers, preferred_element_type=jnp.float32)


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
        return _reference_transposed(lhs, rhs, group_sizes).astype(lhs.dtype)

    monkeypatch.setattr(gmm_gpu, "_ragged_kernel", ragged)
    monkeypatch.setattr(gmm_gpu, "_transposed_kernel", transposed)
    return calls


def _problem(dtype, rows=40, k=128, n=192, sizes=(9, 0, 17, 6)):
    """Rows sorted into groups (one empty) that cover all but the last rows, as expert parallelism pads."""
    r1, r2, r3 = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(r1, (rows, k), dtype), jax.random.normal(r2, (len(sizes), k, n), dtype),
            jnp.asarray(sizes, jnp.int32), jax.random.normal(r3, (rows, n), dtype))


def _value_and_grads(matmul, rows, weights, sizes, cotangent):
    def loss(r, w):
        out = matmul(r, w, sizes)
        return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(rows, weights)
    return [np.asarray(a, np.float32) for a in (out, *grads)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype, kernels", [(jnp.bfloat16, ["ragged", "ragged_T", "transposed"]),
                                            (jnp.float32, [])])
def test_product_and_gradients_equal_ragged_dot(kernel_calls, dtype, kernels):
    rows, weights, sizes, cotangent = _problem(dtype)
    ours = _value_and_grads(gmm_gpu.grouped_matmul, rows, weights, sizes, cotangent)
    reference = _value_and_grads(jax.lax.ragged_dot, rows, weights, sizes, cotangent)
    assert sorted(kernel_calls) == sorted(kernels)
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for name, a, b in zip(("product", "d_rows", "d_weights"), ours, reference):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=name)
    assert not np.any(ours[0][int(sizes.sum()):]) and not np.any(ours[1][int(sizes.sum()):])


@pytest.mark.slow
def test_shapes_the_tiles_do_not_take_fall_back_to_ragged_dot(kernel_calls):
    """A LoRA rank of 32: x A has 32 output columns, (x A) B contracts over 32, and so do their gradients;
    every product falls back (the fakes would fail on a shape the real kernels refuse) with the same values."""
    rows, a, sizes, cotangent = _problem(jnp.bfloat16, n=32)
    b = jax.random.normal(jax.random.key(1), (4, 32, 128), jnp.bfloat16)
    for lhs, weights, out_grad in ((rows, a, cotangent), (rows[:, :32], b, jnp.ones((40, 128), jnp.bfloat16))):
        ours = _value_and_grads(gmm_gpu.grouped_matmul, lhs, weights, sizes, out_grad)
        reference = _value_and_grads(jax.lax.ragged_dot, lhs, weights, sizes, out_grad)
        for a_, b_ in zip(ours, reference):
            np.testing.assert_allclose(a_, b_, rtol=2e-2, atol=2e-2 * np.abs(b_).max())
    assert kernel_calls == []


@pytest.mark.slow
def test_the_moe_block_on_the_kernels_equals_the_blocked_backend(kernel_calls, monkeypatch):
    """grouped_matmul="auto" on a Hopper GPU (faked) takes the kernels."""
    monkeypatch.setattr(kernels, "default_device", lambda: SimpleNamespace(
        platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0"))
    config = MixtralConfig(vocab_size=64, hidden_size=128, intermediate_size=192, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           dtype="bfloat16", grouped_matmul="auto")
    keys = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(keys[0], (2, 8, 128), jnp.bfloat16)
    w1, w3 = (0.1 * jax.random.normal(key, (4, 128, 192), jnp.bfloat16) for key in keys[1:3])
    w2 = 0.1 * jax.random.normal(keys[3], (4, 192, 128), jnp.bfloat16)
    ids, weights = route(jax.random.normal(keys[4], (2, 8, 4)), 2)
    ours = dropless_experts(x, ids, weights.astype(jnp.bfloat16), w1, w2, w3, config)
    blocked = dropless_experts(x, ids, weights.astype(jnp.bfloat16), w1, w2, w3,
                               MixtralConfig(**{**config.__dict__, "grouped_matmul": "blocked"}))
    assert kernel_calls.count("ragged") == 3
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(blocked, np.float32), rtol=2e-2, atol=2e-2)
