"""gmm_tpu: JAX's megablox kernel in Pallas interpret mode on the CPU (the TPU's compiled kernel is the same
program): product, input and weight gradients against `jax.lax.ragged_dot`, with tiles that do not divide the
shapes, empty groups, rows past the last group and LoRA ranks; and a whole model on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.kernels import grouped_matmul_tpu as gmm_tpu
from tests.helpers.grouped_products import problem, value_and_grads

SIZES = (9, 0, 17, 6)  # an empty group; they cover 32 rows, the rest are padding (as expert parallelism pads)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles that divide none of the problem's dimensions but N: M = 37 is padded to 40, K = 40 ends in a
    partial tile of 8 (the kernel masks it), and the weight gradient's (K, N) tiles are partial too."""
    monkeypatch.setattr(gmm_tpu, "TILES", gmm_tpu.Tiles(m=8, k=16, n=16))


def _problem(dtype, rows=37, k=40, n=48, sizes=SIZES):
    return problem(dtype, rows, k, n, sizes)


def _value_and_grads(matmul, rows, weights, sizes, cotangent):
    return value_and_grads(matmul, rows, weights, sizes, cotangent, keep_dtypes=True)


def _assert_equals_ragged_dot(rows, weights, sizes, cotangent, tolerance):
    ours = _value_and_grads(gmm_tpu.grouped_matmul, rows, weights, sizes, cotangent)
    reference = _value_and_grads(jax.lax.ragged_dot, rows, weights, sizes, cotangent)
    for name, a, b in zip(("product", "d_rows", "d_weights"), ours, reference):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=name)
    covered = int(sizes.sum())
    assert not np.any(ours[0][covered:]) and not np.any(ours[1][covered:])  # exactly zero, like ragged_dot


def test_tiles_are_whole_dimensions_or_lane_multiples_that_divide():
    assert gmm_tpu._tile(48, 512) == 48 and gmm_tpu._tile(8, 512) == 8            # a whole dimension: legal
    assert gmm_tpu._tile(14336, 512) == 512 and gmm_tpu._tile(640, 512) == 128
    assert gmm_tpu._tile(1000, 512) == 512                                           # no divisor: masked tail
    assert gmm_tpu._row_tile(2, 512) == 16 and gmm_tpu._row_tile(37, 512) == 48 and gmm_tpu._row_tile(4096, 512) == 512


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_product_and_gradients_equal_ragged_dot_with_tiles_that_do_not_divide(small_tiles, dtype, tolerance):
    _assert_equals_ragged_dot(*_problem(dtype), tolerance)


@pytest.mark.slow
def test_lora_ranks_at_the_default_tiles():
    """x A with A [G, K, 8], then (x A) B with B [G, 8, N]: rank-8 columns and contractions, one row tile."""
    rows, a, sizes, _ = _problem(jnp.float32, n=8)
    b = jax.random.normal(jax.random.key(1), (len(SIZES), 8, 48))
    cotangents = jax.random.normal(jax.random.key(2), (37, 8)), jax.random.normal(jax.random.key(3), (37, 48))
    _assert_equals_ragged_dot(rows, a, sizes, cotangents[0], 1e-5)
    _assert_equals_ragged_dot(rows[:, :8], b, sizes, cotangents[1], 1e-5)


@pytest.mark.slow
def test_float16_is_computed_in_float32():
    """The kernel takes bf16 and fp32 only; fp16 goes through it in fp32 and comes back fp16."""
    rows, weights, sizes, _ = _problem(jnp.float16)
    out = gmm_tpu.grouped_matmul(rows, weights, sizes)
    reference = jax.lax.ragged_dot(rows.astype(jnp.float32), weights.astype(jnp.float32), sizes)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference), rtol=1e-3, atol=1e-2)


@pytest.mark.slow
def test_a_model_on_megablox_gives_the_default_logits(reference_dirs):
    """Within 1e-5 (the paths differ by ~1e-7 here): the experts move these logits by only ~2e-2, so a 0.1%
    error in the grouped product shows at ~6e-5."""
    _, directory = reference_dirs("gqa2_top2")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)))
    default = mj.from_pretrained(directory, dtype="float32")(ids).logits
    megablox = mj.from_pretrained(directory, dtype="float32", grouped_matmul="megablox")(ids).logits
    np.testing.assert_allclose(np.asarray(megablox), np.asarray(default), atol=1e-5, rtol=0)
