"""NF4 quantisation against bitsandbytes 0.50.x on CPU: the same bytes, the same dequantised values."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb_f = pytest.importorskip("bitsandbytes.functional")

from mixtral_jax.quantization import nf4 as Q  # noqa: E402

BLOCKSIZE = 64
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _outlier_tensor(rng) -> np.ndarray:
    """Zero rows (all-zero full blocks), huge and tiny outliers, constant rows, an all-zero short last block."""
    x = (rng.standard_normal((10, 330)) * 0.02).astype(np.float32)  # 3300 = 51 blocks of 64 + 36
    x[0] = 0.0                      # blocks 0-4 entirely zero, block 5 partly
    x[3, 17] = 1e4                  # one outlier dominates its block
    x[5, 100] = -3e3
    x[5, 120:130] = 1e-30           # tiny values next to normal ones
    x[6] = 0.5                      # constant row: every scaled value is exactly 1
    x[7, ::2] = -0.25
    x[-1, -36:] = 0.0               # the short last block is all zero: bnb stores absmax 1e-38 there
    return x


def _input(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if shape == "outliers":
        return _outlier_tensor(rng)
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def _bnb(x: np.ndarray, dtype: str, double_quant: bool):
    xt = torch.from_numpy(np.array(x, dtype=np.float32)).to(TORCH_DTYPES[dtype])
    packed, state = bnb_f.quantize_4bit(xt, blocksize=BLOCKSIZE, quant_type="nf4",
                                        compress_statistics=double_quant)
    return xt, packed, state


def _bnb_flat_dequant(packed, state) -> np.ndarray:
    """bitsandbytes' dequantisation written out in torch (its default backend and CUDA kernel):
    code[nibble] * absmax over blocks of the flat tensor, in fp32, then cast. Returned as fp32 numpy."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
    n = math.prod(state.shape)
    scale = absmax.repeat_interleave(state.blocksize)[:n]
    return (state.code[idx[:n]] * scale).to(state.dtype).float().numpy().reshape(tuple(state.shape))


def _cpu_kernel_is_sound(shape) -> bool:
    """bnb 0.50.2's native CPU dequantize_4bit takes an AVX-512 path whenever the last dimension is a multiple
    of 16, and there indexes absmax per row (`row * (n // blocksize) + k // blocksize`): wrong when the last
    dimension is not a multiple of the block size (e.g. [8, 256, 32]). Elsewhere it agrees with the flat rule."""
    last = shape[-1]
    return last % BLOCKSIZE == 0 or last % 16 != 0


def _as_f32(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


SHAPES = [(64,), (128, 64), (3, 100), (7, 9), (8, 256, 32), (512, 1024), "outliers"]


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_bitsandbytes(shape, dtype, double_quant):
    x = _input(shape)
    xt, packed, state = _bnb(x, dtype, double_quant)
    q = Q.quantize_nf4(jnp.asarray(x).astype(dtype), blocksize=BLOCKSIZE, double_quant=double_quant)

    assert q.shape == tuple(xt.shape) and q.dtype == jnp.dtype(dtype) and q.blocksize == BLOCKSIZE
    assert q.packed.dtype == jnp.uint8 and packed.shape == (q.packed.shape[0], 1)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    if double_quant:
        assert q.absmax is None
        np.testing.assert_array_equal(np.asarray(q.absmax_q), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(q.absmax_scale), state.state2.absmax.numpy())
        assert np.asarray(q.offset).view(np.uint32) == state.offset.numpy().view(np.uint32)
        np.testing.assert_array_equal(np.asarray(q.absmax_code), state.state2.code.numpy())
        assert state.state2.blocksize == Q.DQ_BLOCKSIZE
    else:
        assert q.absmax_q is None
        # bit patterns, so that the 1e-38 of an all-zero short block (a subnormal) is compared exactly too
        np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint32), state.absmax.numpy().view(np.uint32))

    out = Q.dequantize_nf4(q)
    assert out.shape == tuple(xt.shape) and out.dtype == jnp.dtype(dtype)
    ours = _as_f32(out)
    np.testing.assert_array_equal(ours.view(np.uint32), _bnb_flat_dequant(packed, state).view(np.uint32))
    if _cpu_kernel_is_sound(tuple(xt.shape)):
        theirs = bnb_f.dequantize_4bit(packed, state).float().numpy()  # 1-D shapes come back as [1, n]
        np.testing.assert_array_equal(ours.reshape(-1).view(np.uint32), theirs.reshape(-1).view(np.uint32))


def test_bitsandbytes_cpu_dequant_bug_on_avx512():
    """Documents why `_bnb_flat_dequant` is the reference for shapes like [8, 256, 32]."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("the faulty kernel path is AVX-512 only")
    x = _input((4, 96))
    _, packed, state = _bnb(x, "float32", False)
    ours = _as_f32(Q.dequantize_nf4(Q.quantize_nf4(jnp.asarray(x))))
    np.testing.assert_array_equal(ours, _bnb_flat_dequant(packed, state))
    assert not np.array_equal(bnb_f.dequantize_4bit(packed, state).numpy(), ours)  # bnb 0.50.2's bug


def test_code_books_match_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    _, state = bnb_f.quantize_4bit(torch.ones(64), blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(Q.NF4_CODE, state.code.numpy())
    bounds, order = _get_4bit_quantize_bounds("nf4", torch.device("cpu"))
    np.testing.assert_array_equal(Q._NF4_MIDPOINTS, bounds.numpy())
    np.testing.assert_array_equal(order.numpy(), np.arange(16))
    np.testing.assert_array_equal(Q.DYNAMIC_CODE, bnb_f.create_dynamic_map(signed=True).numpy())
    assert Q.DYNAMIC_CODE[0] == np.float32(-0.99296875)  # not -1: bnb 0.50 no longer patches it


def _nf4_codes(values: np.ndarray, absmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantise one 64-block (the values + one element equal to absmax) with bnb and with us: unpacked codes."""
    block = np.zeros(64, np.float32)
    block[0] = absmax
    block[1:1 + len(values)] = values
    _, packed, _ = _bnb(block, "float32", False)
    ours = np.asarray(Q.quantize_nf4(jnp.asarray(block)).packed)
    unpack = lambda p: np.stack([p >> 4, p & 15], 1).reshape(-1)[1:1 + len(values)]
    return unpack(packed.numpy().reshape(-1)), unpack(ours)


def test_midpoint_ties_take_the_lower_code():
    mids = Q._NF4_MIDPOINTS
    theirs, ours = _nf4_codes(mids, 1.0)  # absmax 1: scaled values are the midpoints themselves
    np.testing.assert_array_equal(theirs, np.arange(15))
    np.testing.assert_array_equal(ours, theirs)
    above = np.nextafter(mids, np.float32(2))
    theirs, ours = _nf4_codes(above, 1.0)
    np.testing.assert_array_equal(theirs, np.arange(1, 16))
    np.testing.assert_array_equal(ours, theirs)


def test_full_blocks_multiply_by_the_reciprocal_short_blocks_divide():
    """Find x with bucketize(x * (1/a)) != bucketize(x / a): bnb takes the first in full blocks, the second in
    a short last block; so do we."""
    a = np.float32(0.0370001)
    recip = np.float32(1) / a
    found = []
    for m in Q._NF4_MIDPOINTS:
        base = np.float32(m * a)
        for k in range(-64, 65):
            x = np.float32(base + np.float32(k) * np.spacing(base))
            by_mul = np.searchsorted(Q._NF4_MIDPOINTS, np.float32(x * recip), side="left")
            by_div = np.searchsorted(Q._NF4_MIDPOINTS, np.float32(x / a), side="left")
            if by_mul != by_div and abs(x) < a:
                found.append((x, by_mul, by_div))
    assert len(found) >= 2, "no discriminating value found"
    xs = np.array([f[0] for f in found[:30]], np.float32)
    theirs, ours = _nf4_codes(xs, a)
    np.testing.assert_array_equal(theirs, [f[1] for f in found[:30]])
    np.testing.assert_array_equal(ours, theirs)
    # the same values in a short last block (64 + 31 elements)
    tail = np.zeros(31, np.float32)
    tail[0] = a
    tail[1:1 + min(30, len(xs))] = xs[:30]
    x = np.concatenate([np.full(64, 0.5, np.float32), tail])
    _, packed, _ = _bnb(x, "float32", False)
    ours_packed = np.asarray(Q.quantize_nf4(jnp.asarray(x)).packed)
    np.testing.assert_array_equal(ours_packed, packed.numpy().reshape(-1))
    codes = np.stack([ours_packed >> 4, ours_packed & 15], 1).reshape(-1)[65:65 + min(30, len(xs))]
    np.testing.assert_array_equal(codes, [f[2] for f in found[:30]])


def test_8bit_absmax_quantiser_matches_bitsandbytes():
    """bnb 0.50's CPU quantize_blockwise (LUT over a 65536-point grid), on values built to hit its corners."""
    code = Q.DYNAMIC_CODE
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    rng = np.random.default_rng(3)
    probes = np.concatenate([
        code, np.nextafter(code, np.float32(2)), np.nextafter(code, np.float32(-2)),
        mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
        np.linspace(-1, 1, 2 * 65535 + 1, dtype=np.float32)[::7],  # grid points and the halves between them
        np.linspace(-3e-4, 3e-4, 2001, dtype=np.float32),         # near zero codes are closer than the grid
        rng.uniform(-1, 1, 20000).astype(np.float32),
    ]).clip(-1, 1)
    n_anchor = -(-probes.size // 255)
    body = np.zeros(n_anchor * 255, np.float32)
    body[: probes.size] = probes
    anchored = np.concatenate([np.ones((n_anchor, 1), np.float32), body.reshape(n_anchor, 255)], axis=1)
    # column 0 is 1.0, so each block's absmax is 1 and every probe is its own normalised value
    free = rng.standard_normal(256 * 40 + 77).astype(np.float32) * np.float32(3e-3)  # arbitrary scales, short tail
    v = np.concatenate([anchored.reshape(-1), np.zeros(256, np.float32), free])    # plus an all-zero block
    theirs, state = bnb_f.quantize_blockwise(torch.from_numpy(v), blocksize=256)
    codes, scales = jax.jit(Q._quantize_dynamic_8bit)(jnp.asarray(v))
    np.testing.assert_array_equal(np.asarray(scales), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(codes), theirs.numpy())
    assert np.asarray(codes)[anchored.size: anchored.size + 256].max() == 0


@pytest.mark.parametrize("n,threads", [(5, 1), (17, 1), (1000, 1), (4097, 1), (40000, 1), (40000, 2), (70001, 2)])
def test_offset_is_torchs_mean(n, threads):
    rng = np.random.default_rng(n)
    before = torch.get_num_threads()
    fn = jax.jit(partial(Q._torch_cpu_mean, lanes=8, threads=threads))
    try:
        torch.set_num_threads(threads)
        for _ in range(5):
            x = (np.abs(rng.standard_normal(n)) * rng.uniform(1e-3, 1)).astype(np.float32)
            assert np.asarray(fn(jnp.asarray(x))).view(np.uint32) == torch.from_numpy(x).mean().numpy().view(np.uint32)
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_jit_eager_and_nested_jit_agree(double_quant):
    x = jnp.asarray(_input("outliers", seed=4)).astype(jnp.bfloat16)
    q = Q.quantize_nf4(x, double_quant=double_quant)
    nested = jax.jit(lambda a: Q.quantize_nf4(a, double_quant=double_quant))(x)
    with jax.disable_jit():
        eager = Q.quantize_nf4(x, double_quant=double_quant)
        eager_out = Q.dequantize_nf4(eager)
    for other in (nested, eager):
        assert jax.tree.structure(other) == jax.tree.structure(q)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(other)):
            raw = lambda t: np.asarray(t).reshape(-1).view(np.uint8)  # bytes: exact, subnormals included
            np.testing.assert_array_equal(raw(a), raw(b))
    out = Q.dequantize_nf4(q)
    np.testing.assert_array_equal(_as_f32(out), _as_f32(eager_out))
    np.testing.assert_array_equal(_as_f32(jax.jit(lambda t: Q.dequantize_nf4(t))(q)), _as_f32(out))
    _, packed, state = _bnb(np.asarray(x.astype(jnp.float32)), "bfloat16", double_quant)
    np.testing.assert_array_equal(np.asarray(nested.packed), packed.numpy().reshape(-1))


def test_storage_bytes_per_parameter():
    x = jnp.asarray(_input((1024, 1024), seed=5))
    n = x.size
    plain = Q.quantize_nf4(x)
    dq = Q.quantize_nf4(x, double_quant=True)
    assert Q.nbytes(plain) == n // 2 + 4 * (n // 64)  # 4 bits + one fp32 per 64: 4.5 bits
    assert 8 * Q.nbytes(plain) / n == 4.5
    assert Q.nbytes(dq) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert Q.nbytes(dq) / n <= 0.52
    assert abs(8 * Q.nbytes(dq) / n - 4.127) < 1e-3
    assert Q.nbytes(dq, include_code_map=True) == Q.nbytes(dq) + 256 * 4
    assert Q.nbytes(dq) < Q.nbytes(plain) < x.nbytes / 7


def test_pytree_and_output_dtype():
    x = jnp.asarray(_input((3, 100), seed=6))
    q = Q.quantize_nf4(x, double_quant=True)
    assert len(jax.tree.leaves(q)) == 5 and q.double_quant and q.n_blocks == 5
    moved = jax.tree.map(lambda a: a, q)
    assert moved.shape == (3, 100) and moved.dtype == jnp.float32
    ref = torch.from_numpy(np.array(_as_f32(Q.dequantize_nf4(q)))).to(torch.bfloat16).float().numpy()
    as_bf16 = Q.dequantize_nf4(q, jnp.bfloat16)
    assert as_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_as_f32(as_bf16), ref)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        Q.quantize_nf4(jnp.ones((4, 64), jnp.int32))
    with pytest.raises(ValueError):
        Q.quantize_nf4(jnp.ones((4, 64)), blocksize=48)
