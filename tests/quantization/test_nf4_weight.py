"""The model's NF4 weights (NF4Weight) against bitsandbytes 0.50.x on CPU: each layer's slice, and each expert's
matrix, is one bitsandbytes tensor, double-quantised by default (Chinese-Mixtral's bnb_4bit_use_double_quant)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb_f = pytest.importorskip("bitsandbytes.functional")

from mixtral_jax.quantization.nf4_weight import (  # noqa: E402
    NF4Weight,
    block_scales,
    dequantize_weight,
    quantize_weight,
)


def _weight(shape, seed=0, dtype=jnp.float32) -> jax.Array:
    scale = np.random.default_rng(seed).uniform(0.5, 2.0, shape[:-1] + (1,))  # rows of different magnitude
    return jnp.asarray((np.random.default_rng(seed + 1).standard_normal(shape) * 0.02 * scale).astype(np.float32),
                       dtype)


def _bnb(tensor: np.ndarray, double_quant: bool = True):
    """bitsandbytes' own 4-bit state of one tensor, and its dequantisation (fp32 numpy)."""
    packed, state = bnb_f.quantize_4bit(torch.from_numpy(np.array(tensor, np.float32)), blocksize=64,
                                        quant_type="nf4", compress_statistics=double_quant)
    return packed, state, bnb_f.dequantize_4bit(packed, state).float().numpy()


def _check_tensor(q: NF4Weight, index: tuple, tensor: np.ndarray, codes: np.ndarray, packed: np.ndarray):
    """One bitsandbytes tensor of q (at `index` of its leading tensor axes) equals bnb's state of `tensor`;
    returns bnb's dequantisation of it."""
    ref_packed, state, ref = _bnb(tensor)
    assert state.nested and state.state2.blocksize == 256
    assert packed.tobytes() == ref_packed.numpy().tobytes()
    np.testing.assert_array_equal(codes.reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.absmax_scale[index]), state.state2.absmax.numpy())
    assert np.asarray(q.offset[index]).shape == (1,)
    assert np.asarray(q.offset[index]).view(np.uint32)[0] == state.offset.numpy().view(np.uint32)
    return ref


@pytest.mark.slow
def test_double_quantised_layer_slices_dequantise_as_bitsandbytes():
    """[L, D, H, hd] (q_proj's layout): 640 blocks per layer, so three 256-groups, the last one short."""
    weight = _weight((2, 160, 4, 64))
    q = quantize_weight(weight, ("layers", "embed", "heads", "head_dim"), leading=1)  # double-quantised: default
    assert q.double_quant and q.absmax is None and q.by_rows
    assert q.packed.shape == (2, 160, 4, 32) and q.absmax_q.shape == (2, 160, 4, 1) and q.absmax_q.dtype == jnp.uint8
    assert q.absmax_scale.shape == (2, 3) and q.offset.shape == (2, 1)
    out = np.asarray(dequantize_weight(q))
    assert out.shape == weight.shape and out.dtype == np.float32
    for layer in range(2):
        ref = _check_tensor(q, (layer,), np.asarray(weight[layer]), np.asarray(q.absmax_q[layer]),
                               np.asarray(q.packed[layer]))
        np.testing.assert_array_equal(out[layer].view(np.uint32), ref.view(np.uint32))


@pytest.mark.slow
def test_double_quantised_experts_are_one_bitsandbytes_tensor_each():
    """[L, E, D, F]: every expert's matrix has its own offset and 256-groups (legacy Mixtral: one nn.Linear per
    expert); its 288 blocks, 3 per row, make a 256-group end inside a row."""
    weight = _weight((2, 3, 96, 192), seed=2)
    q = quantize_weight(weight, ("layers", "experts", "embed", "mlp"), leading=1)
    assert q.absmax_q.shape == (2, 3, 96, 3) and q.absmax_scale.shape == (2, 3, 2) and q.offset.shape == (2, 3, 1)
    out = np.asarray(dequantize_weight(q))
    for layer in range(2):
        for expert in range(3):
            ref = _check_tensor(q, (layer, expert), np.asarray(weight[layer, expert]),
                                   np.asarray(q.absmax_q[layer, expert]), np.asarray(q.packed[layer, expert]))
            np.testing.assert_array_equal(out[layer, expert].view(np.uint32), ref.view(np.uint32))
    # the offsets are the experts' own: a layer-wide tensor would have one
    assert len({float(o) for o in np.asarray(q.offset).reshape(-1)}) == 6


@pytest.mark.slow
def test_router_blocked_over_the_flat_slice_and_bf16_output():
    """[L, D, E] with E below 64: blocks over each layer's flat slice; dequantised to bf16 as bnb casts."""
    weight = _weight((2, 64, 8), seed=4, dtype=jnp.bfloat16)
    q = quantize_weight(weight, ("layers", "embed", None), leading=1)
    assert not q.by_rows and q.packed.shape == (2, 256) and q.absmax_q.shape == (2, 8) and q.dtype == "bfloat16"
    out = dequantize_weight(q)
    assert out.dtype == jnp.bfloat16 and out.shape == weight.shape
    for layer in range(2):
        tensor = torch.from_numpy(np.array(weight[layer].astype(jnp.float32))).to(torch.bfloat16)
        packed, state = bnb_f.quantize_4bit(tensor, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert np.asarray(q.packed[layer]).tobytes() == packed.numpy().tobytes()
        ref = bnb_f.dequantize_4bit(packed, state).float().numpy()
        np.testing.assert_array_equal(np.asarray(out[layer].astype(jnp.float32)), ref)


def test_plain_nf4_is_still_available():
    weight = _weight((2, 64, 128), seed=6)
    q = quantize_weight(weight, ("layers", "embed", "mlp"), leading=1, double_quant=False)
    assert not q.double_quant and q.absmax_q is None and q.absmax.shape == (2, 64, 2)
    assert q.absmax.dtype == jnp.float32 and q.nbytes == weight.size // 2 + 4 * (weight.size // 64)
    for layer in range(2):
        packed, state, ref = _bnb(np.asarray(weight[layer]), double_quant=False)
        assert np.asarray(q.packed[layer]).tobytes() == packed.numpy().tobytes()
        np.testing.assert_array_equal(np.asarray(q.absmax[layer]).reshape(-1), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(dequantize_weight(q)[layer]), ref)
    dq = quantize_weight(weight, ("layers", "embed", "mlp"), leading=1)
    assert np.array_equal(np.asarray(dq.packed), np.asarray(q.packed))  # the same 4-bit codes
    # double quantisation moves each block's scale by at most half a step of its 8-bit code (<1% of the largest)
    plain_scales = np.asarray(q.absmax)
    np.testing.assert_allclose(np.asarray(block_scales(dq)), plain_scales, atol=0.01 * plain_scales.max(), rtol=0)
    assert dq.nbytes == weight.size // 2 + weight.size // 64 + 2 * (4 + 4)  # per layer: one 256-group, an offset


@pytest.mark.slow
def test_slices_dequantise_inside_a_layer_scan_and_under_jit():
    """Inside the layer scan every array loses its layer axis; the scales rebuild per tensor all the same."""
    weight = _weight((3, 2, 64, 128), seed=8)
    q = quantize_weight(weight, ("layers", "experts", "embed", "mlp"), leading=1)
    whole = np.asarray(dequantize_weight(q))

    def body(carry, layer_q):
        return carry, dequantize_weight(layer_q)

    _, scanned = jax.jit(lambda q: jax.lax.scan(body, 0, q))(q)
    np.testing.assert_array_equal(np.asarray(scanned), whole)
    one = jax.tree.map(lambda a: a[1], q)
    assert one.leading == () and one.offset.shape == (2, 1)
    np.testing.assert_array_equal(np.asarray(dequantize_weight(one)), whole[1])


def test_a_slice_quantised_alone_gives_the_stacked_arrays():
    """What the converter does (one layer's slice, or one expert's matrix, as its own tensor) gives quantize_base's
    arrays."""
    weight = _weight((2, 2, 64, 128), seed=10)
    axes = ("layers", "experts", "embed", "mlp")
    q = quantize_weight(weight, axes, leading=1)
    alone = quantize_weight(weight[1, 0][None], axes, leading=1, tensors=1)
    for name in ("packed", "absmax_q", "absmax_scale", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(alone, name))[0], np.asarray(getattr(q, name))[1, 0])
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_weight(jnp.ones((2, 3, 7)), ("layers", None, None))
