"""NF4 quantisation (QLoRA), bit for bit what bitsandbytes 0.50.x computes on CPU.

`quantize_nf4(x)` gives the same bytes as `bitsandbytes.functional.quantize_4bit(x, blocksize=64,
quant_type="nf4", compress_statistics=...)`, and `dequantize_nf4(q)` the same values as `dequantize_4bit`.
What bitsandbytes 0.50.2 does, step by step (read from its CPU code and checked against it in
tests/quantization/test_nf4.py):

4-bit (the backend-independent torch path, `backends/default/ops.py`):
* The tensor is flattened (fp16/bf16 upcast to fp32, exactly) and cut into blocks of `blocksize`; the last
  block may be short. absmax = max|x| per block, over the real elements only.
* A full block is scaled by `x * (1 / max(absmax, 1e-38))`: a multiply by the fp32 reciprocal, not a division
  (the two differ in the last bit, and that moves an element across a threshold now and then). The short last
  block is scaled by a true division `x / max(absmax, 1e-38)`, and its *stored* absmax is the clamped one, so an
  all-zero short block stores 1e-38 (a subnormal) where an all-zero full block stores 0.
* The scaled value is clamped to [-1, 1] and its code is `torch.bucketize(scaled, midpoints)` with the 15
  fp32 midpoints `(code[i] + code[i+1]) / 2`, right=False: the number of midpoints strictly below the value,
  so a value exactly on a midpoint takes the lower code.
* Codes are packed two per byte, the first element in the high nibble; an odd element count is padded with one
  scaled 0 (code 7) in the last low nibble. bitsandbytes returns the bytes as [ceil(n/2), 1]; here they are flat.

Double quantisation (`compress_statistics=True`):
* offset = `absmax.mean()` in torch on CPU: torch's cascade sum (SumKernel.cpp), then a division by the count.
  Its rounding depends on the vector width of torch's sum kernel (8 fp32 lanes: measured so on an AVX-512
  host with torch 2.13) and, from 32768 blocks on, on torch's thread count. `_torch_cpu_sum` replays that
  summation order exactly for a given width and thread count (`mean_lanes`, `mean_threads`); a plain
  `jnp.mean` misses torch's last bit for a third to a half of random tensors.
* `absmax - offset` is quantised blockwise (256) by the native CPU kernel with the signed 8-bit dynamic map
  (`create_dynamic_map(signed=True)`, its first entry -0.99296875, not -1). That kernel is *not* "nearest
  code": it scales by `v * (1 / absmax256)`, clamps to [-1, 1], maps to a 65536-entry grid with
  `trunc((v + 1) * 0.5 * 65535 + 0.5)`, and reads the code from a table built over that grid (`_dynamic_lut`).
  Near zero, where the map's codes are closer than the grid, this gives codes a nearest-code rule would not
  (0.0 becomes code 131, +2.1e-5). An all-zero 256-block gets code 0 and scale 0.
* Dequantisation: absmax = `code8[q] * absmax256` (fp32, rounded), then `+ offset` (a second rounding).

Dequantisation: `code[nibble] * absmax` in fp32, then cast to the output dtype (round to nearest even).
bitsandbytes 0.50.2's CPU kernel is wrong on AVX-512 hosts when the last dimension is a multiple of 16 but
not of the block size (it indexes absmax per row, not per flat block); this module computes what its torch
and scalar paths (and, per its comments, CUDA) compute: blocks over the flat tensor.

XLA would change three roundings unless kept from it (each guard below is caught by a test if removed): it
contracts `a * b + c` into one fma (bnb rounds the product first), and it rewrites a division by a constant
or by a broadcast scalar into a multiply by the rounded reciprocal. Checked on XLA:CPU only, not on GPU.

Known deviations, all outside real weights: XLA on CPU flushes subnormals to zero, so a block whose absmax is
subnormal (below 1.2e-38) can quantise differently; NaN/inf inputs are not reproduced.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["NF4Tensor", "NF4_CODE", "DYNAMIC_CODE", "DQ_BLOCKSIZE", "quantize_nf4", "dequantize_nf4",
           "dequantize_blocks", "dequantize_absmax", "block_absmax", "nbytes"]

# bitsandbytes' NF4 code book (fp32), sorted; index 7 is exact zero.
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
# The 15 thresholds torch.bucketize compares against, computed in fp32 as bitsandbytes does.
_NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

DQ_BLOCKSIZE = 256  # block size of the second (8-bit) quantisation of the absmax values
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_LUT_SIZE = 65536
_TORCH_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: below it torch reduces on one thread
_F32_1E_38 = np.array(7136238, np.uint32).view(np.float32)  # fp32(1e-38), a subnormal: bnb's absmax floor


def _create_dynamic_map() -> np.ndarray:
    """`bitsandbytes.functional.create_dynamic_map(signed=True)` in fp32, without torch.

    bitsandbytes builds it from `torch.linspace(0.1, 1, k, dtype=float32)`, whose CPU kernel evaluates
    `start + step * i` (first half) and `end - step * (k - 1 - i)` (second half) with one rounding (a fused
    multiply-add); the rest is fp32 arithmetic. Checked entry by entry against bitsandbytes in the tests.
    """
    f32 = np.float32
    data: list[np.float32] = []
    for i in range(7):  # max_exponent_bits = 7, total_bits = 8, signed
        k = 2 ** i + 1
        start, end = f32(0.1), f32(1.0)
        step = f32((end - start) / f32(k - 1))
        bounds = np.array(
            [f32(float(start) + float(step) * j) if j < k // 2 else f32(float(end) - float(step) * (k - 1 - j))
             for j in range(k)], dtype=np.float32)  # exact in float64, one rounding to fp32 = fma
        means = ((bounds[:-1] + bounds[1:]) / f32(2)).astype(np.float32)
        scale = f32(10.0 ** (-6 + i))
        data += list((scale * means).astype(np.float32))
        data += list((-scale * means).astype(np.float32))
    data += [f32(0.0), f32(1.0)]
    assert len(data) == 256
    return np.sort(np.array(data, dtype=np.float32))


DYNAMIC_CODE = _create_dynamic_map()


def _dynamic_lut(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' `build_quantize_lut`: grid point i of [-1, 1] -> number of code midpoints below it."""
    f32 = np.float32
    midpoints = (f32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (f32(-1.0) + (f32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / f32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut(DYNAMIC_CODE)


@struct.dataclass
class NF4Tensor:
    """An NF4-quantised tensor: a pytree whose leaves are the stored arrays, with static shape metadata.

    Without double quantisation `absmax` holds one fp32 scale per block and the four double-quantisation
    fields are None. With it `absmax` is None and the scales are `absmax_code[absmax_q] * absmax_scale[i //
    256] + offset` (bitsandbytes: `state.absmax`, `state.state2.absmax`, `state.offset`, `state.state2.code`).
    """

    packed: jax.Array                      # uint8 [ceil(n / 2)], element 2i in the high nibble of byte i
    absmax: jax.Array | None = None        # fp32 [n_blocks]
    absmax_q: jax.Array | None = None      # uint8 [n_blocks]: 8-bit codes of absmax - offset
    absmax_scale: jax.Array | None = None  # fp32 [ceil(n_blocks / 256)]: absmax of each 256-block of those
    offset: jax.Array | None = None        # fp32 []: mean of the absmax values
    absmax_code: jax.Array | None = None   # fp32 [256]: the signed 8-bit dynamic map (a constant)
    shape: tuple[int, ...] = struct.field(pytree_node=False, default=())
    dtype: Any = struct.field(pytree_node=False, default=np.dtype(np.float32))
    blocksize: int = struct.field(pytree_node=False, default=64)

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.size // self.blocksize)


# ---------------------------------------------------------------------------------------------------------
# torch's CPU float32 sum, replayed (for the double-quantisation offset)


def _ceil_log2(x: int) -> int:  # ATen's utils::CeilLog2
    return 1 if x <= 2 else (x - 1).bit_length()


def _seq_sum(a: jax.Array, axis: int = 0) -> jax.Array:
    """((0 + a[0]) + a[1]) + ... along `axis`, in exactly that order."""
    a = jnp.moveaxis(a, axis, 0)
    acc = jnp.zeros(a.shape[1:], jnp.float32)
    if a.shape[0] <= 64:
        for i in range(a.shape[0]):
            acc = acc + a[i]
        return acc
    return jax.lax.scan(lambda c, x: (c + x, None), acc, a)[0]


def _multi_row_sum(items: jax.Array) -> jax.Array:
    """ATen's `multi_row_sum` (4-level cascade) over the leading axis of items [size, ...]."""
    size = items.shape[0]
    level_power = max(4, _ceil_log2(size) // 4)
    step = 1 << level_power
    n_chunks = size // step
    zero = jnp.zeros(items.shape[1:], jnp.float32)
    acc1 = acc2 = acc3 = zero
    if n_chunks:
        chunk_sums = _seq_sum(items[: n_chunks * step].reshape(n_chunks, step, *items.shape[1:]), axis=1)
        g1 = n_chunks // step  # acc1 flushes into acc2 after every `step` chunks
        level1 = _seq_sum(chunk_sums[: g1 * step].reshape(g1, step, *items.shape[1:]), axis=1)
        acc1 = _seq_sum(chunk_sums[g1 * step:])
        g2 = g1 // step  # acc2 flushes into acc3 after every `step` level-1 sums
        level2 = _seq_sum(level1[: g2 * step].reshape(g2, step, *items.shape[1:]), axis=1)
        acc2 = _seq_sum(level1[g2 * step:])
        acc3 = _seq_sum(level2)
    acc0 = _seq_sum(items[n_chunks * step:])
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(items: jax.Array) -> jax.Array:
    """ATen's `row_sum`: the leading axis read as rows of 4 (instruction-level parallelism), then combined."""
    size = items.shape[0]
    size_ilp = size // 4
    partial_sums = _multi_row_sum(items[: size_ilp * 4].reshape(size_ilp, 4, *items.shape[1:]))
    total = partial_sums[0]
    for i in range(size_ilp * 4, size):
        total = total + items[i]
    for k in range(1, 4):
        total = total + partial_sums[k]
    return total


def _torch_cpu_sum_serial(x: jax.Array, lanes: int) -> jax.Array:
    n = x.shape[0]
    if n < lanes:  # too short for a vector: scalar row_sum
        return _row_sum(x)
    n_vec = n // lanes
    vec_acc = _row_sum(x[: n_vec * lanes].reshape(n_vec, lanes))  # `vectorized_inner_sum`
    total = jnp.zeros((), jnp.float32)
    for k in range(n_vec * lanes, n):
        total = total + x[k]
    for lane in range(lanes):
        total = total + vec_acc[lane]
    return total


def _torch_cpu_sum(x: jax.Array, lanes: int = 8, threads: int = 1) -> jax.Array:
    """`torch.sum` of a contiguous 1-D float32 CPU tensor, bit for bit (torch 2.x, SumKernel.cpp).

    lanes: fp32 lanes of the `Vectorized<float>` torch's sum kernel runs with: 8 on x86 (the sum kernel has no
    AVX-512 build, so AVX-512 hosts run the AVX2 one) and on ARM NEON.
    threads: `torch.get_num_threads()`; matters only from 32768 elements on (two-pass parallel reduction).
    """
    n = x.shape[0]
    if n < _TORCH_GRAIN_SIZE or threads <= 1:
        return _torch_cpu_sum_serial(x, lanes)
    used = min(threads, -(-n // _TORCH_GRAIN_SIZE))
    chunk = -(-n // used)  # at::parallel_for: thread t sums [t * chunk, (t + 1) * chunk)
    partials = [_torch_cpu_sum_serial(x[t * chunk: min(n, (t + 1) * chunk)], lanes)
                for t in range(used) if t * chunk < n]
    buffer = jnp.stack(partials + [jnp.zeros((), jnp.float32)] * (threads - len(partials)))
    return _torch_cpu_sum_serial(buffer, lanes)


def _torch_cpu_mean(x: jax.Array, lanes: int = 8, threads: int = 1) -> jax.Array:
    """`x.mean()` of a 1-D float32 CPU tensor in torch: `_torch_cpu_sum`, then a true division by the count."""
    total = _torch_cpu_sum(x, lanes, threads)
    # XLA turns a division by a constant into a multiply by its rounded reciprocal (off by an ulp now and
    # then), so the divisor is made data-dependent: 0 * total is 0 for any finite total
    return total / (jnp.float32(x.shape[0]) + 0.0 * total)


# ---------------------------------------------------------------------------------------------------------
# quantisation


def _nf4_index(scaled: jax.Array) -> jax.Array:
    """torch.bucketize(scaled, midpoints, right=False): the number of midpoints strictly below each value."""
    idx = jnp.zeros(scaled.shape, jnp.int32)
    for bound in _NF4_MIDPOINTS:  # 15 compares against constants, fused into one elementwise loop
        idx = idx + (scaled > bound).astype(jnp.int32)
    return idx


def _quantize_dynamic_8bit(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes 0.50 CPU `quantize_blockwise(v, blocksize=256)` of fp32 v [m]: (uint8 codes [m], fp32 [blocks])."""
    m = v.shape[0]
    n_blocks = -(-m // DQ_BLOCKSIZE)
    vp = jnp.pad(v, (0, n_blocks * DQ_BLOCKSIZE - m)).reshape(n_blocks, DQ_BLOCKSIZE)
    mag = jnp.abs(vp)
    absmax = jnp.max(jnp.where(jnp.isnan(mag), 0.0, mag), axis=1)  # NaN lanes count as 0, as in the kernel
    nonzero = absmax > 0
    inv = 1.0 / jnp.where(nonzero, absmax, 1.0)
    normed = jnp.clip(vp * inv[:, None], -1.0, 1.0)
    # grid index trunc(((normed + 1) * 0.5) * 65535 + 0.5), written without an add after the product so
    # that no compiler can fuse the two into a multiply-add (that would round once instead of twice)
    y = ((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1)
    floor = jnp.floor(y)
    grid = floor.astype(jnp.int32) + (y >= floor + 0.5).astype(jnp.int32)
    codes = jnp.asarray(_DYNAMIC_LUT)[grid]
    codes = jnp.where(nonzero[:, None], codes, jnp.uint8(0))  # an all-zero block: codes 0
    return codes.reshape(-1)[:m], absmax


def _no_fma(p: jax.Array) -> jax.Array:
    """p, unchanged, but opaque enough that a following add is not fused with the multiply producing it.

    XLA lets LLVM contract `a * b + c` into one fma (one rounding); bitsandbytes rounds the product first.
    A select between the two stops the contraction (the NaN branch never differs from bitsandbytes' result in
    a way that matters: a NaN scale is garbage either way).
    """
    return jnp.where(jnp.isnan(p), jnp.float32(0), p)


@partial(jax.jit, static_argnames=("blocksize", "double_quant", "mean_lanes", "mean_threads"))
def quantize_nf4(x: jax.Array, blocksize: int = 64, double_quant: bool = False, *,
                 mean_lanes: int = 8, mean_threads: int = 1) -> NF4Tensor:
    """NF4-quantise x (fp32, bf16 or fp16, any shape) as bitsandbytes' `quantize_4bit(..., quant_type="nf4")`.

    double_quant: also quantise the block scales to 8 bits (bitsandbytes' compress_statistics=True, QLoRA's
    "double quantisation"), ~4.127 bits per parameter instead of 4.5 at blocksize 64.
    mean_lanes, mean_threads: how the torch that bitsandbytes runs on sums the absmax values for the offset
    (see `_torch_cpu_sum`); they only move the offset's last bit. Defaults: one thread (or
    any thread count below 32768 blocks, i.e. tensors under 2M elements at blocksize 64), the x86/NEON width.
    """
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"NF4 quantisation takes fp32, bf16 or fp16, got {x.dtype}")
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_VALID_BLOCKSIZES}, got {blocksize}")
    n = x.size
    if n == 0:
        raise ValueError("cannot quantise an empty tensor")
    n_blocks = -(-n // blocksize)
    rem = n % blocksize

    flat = x.reshape(-1).astype(jnp.float32)
    blocks = jnp.pad(flat, (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    nonzero = absmax > 0  # a zero block scales to zeros (torch: 0 * (1 / 1e-38) = 0)
    safe = jnp.where(nonzero, absmax, 1.0)
    scaled = jnp.where(nonzero[:, None], blocks * (1.0 / safe)[:, None], 0.0)  # reciprocal, then multiply
    if rem:  # the short last block: a true division, and its stored absmax is clamped to 1e-38
        # (XLA rewrites x / broadcast(s) into x * (1 / s); adding 0 * x keeps it a true elementwise division)
        last = jnp.where(nonzero[-1], blocks[-1] / (safe[-1] + 0.0 * blocks[-1]), 0.0)
        scaled = scaled.at[-1].set(last)
        absmax = absmax.at[-1].set(jnp.where(nonzero[-1], absmax[-1], jnp.asarray(_F32_1E_38)))
    idx = _nf4_index(jnp.clip(scaled, -1.0, 1.0)).reshape(-1)
    idx = idx[: n + (n % 2)].astype(jnp.uint8)  # padding scales to 0: code 7 in a trailing low nibble
    packed = (idx[0::2] << 4) | idx[1::2]

    meta = dict(shape=tuple(x.shape), dtype=jnp.dtype(x.dtype), blocksize=blocksize)
    if not double_quant:
        return NF4Tensor(packed=packed, absmax=absmax, **meta)
    offset = _torch_cpu_mean(absmax, mean_lanes, mean_threads)
    absmax_q, absmax_scale = _quantize_dynamic_8bit(absmax - offset)
    return NF4Tensor(packed=packed, absmax_q=absmax_q, absmax_scale=absmax_scale, offset=offset,
                     absmax_code=jnp.asarray(DYNAMIC_CODE), **meta)


def block_absmax(q: NF4Tensor) -> jax.Array:
    """The fp32 scale of every block ([n_blocks]), rebuilt from the 8-bit form under double quantisation."""
    if not q.double_quant:
        return q.absmax
    return dequantize_absmax(q.absmax_q, q.absmax_scale, q.offset, q.absmax_code)


def dequantize_absmax(absmax_q: jax.Array, absmax_scale: jax.Array, offset: jax.Array,
                      code: jax.Array | None = None) -> jax.Array:
    """Double quantisation's block scales, `code[absmax_q] * absmax_scale[i // 256] + offset` in fp32 (two
    roundings, as bitsandbytes): `absmax_q` [..., n_blocks] uint8, `absmax_scale` [..., ceil(n_blocks / 256)],
    `offset` [...], one tensor per leading index; `code` the signed 8-bit dynamic map (default DYNAMIC_CODE)."""
    code = jnp.asarray(DYNAMIC_CODE if code is None else code)
    scale = jnp.repeat(absmax_scale, DQ_BLOCKSIZE, axis=-1)[..., : absmax_q.shape[-1]]
    return _no_fma(code[absmax_q.astype(jnp.int32)] * scale) + offset[..., None]


def dequantize_blocks(packed: jax.Array, absmax: jax.Array) -> jax.Array:
    """`code[nibble] * absmax` in fp32, the one dequantisation: `packed` [..., B * blocksize / 2] bytes (two
    codes each, the first in the high nibble), `absmax` [..., B] scales; returns [..., B, blocksize]."""
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], absmax.shape[-1], -1)
    return jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)] * absmax[..., None]


@partial(jax.jit, static_argnames=("dtype",))
def dequantize_nf4(q: NF4Tensor, dtype: Any = None) -> jax.Array:
    """The tensor q stands for, in q's shape and `dtype` (default: the quantised tensor's dtype).

    Equal to bitsandbytes' `dequantize_4bit`: `code[nibble] * absmax` in fp32, then one rounding to dtype.
    """
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    packed = jnp.pad(q.packed, (0, q.n_blocks * q.blocksize // 2 - q.packed.shape[0]))  # the short last block
    values = dequantize_blocks(packed, block_absmax(q))
    return values.reshape(-1)[: q.size].reshape(q.shape).astype(dtype)


def nbytes(q: NF4Tensor, include_code_map: bool = False) -> int:
    """Bytes q stores: packed codes + absmax (fp32) or, double-quantised, its 8-bit codes + the fp32 scales
    of those + the offset. The 256-entry dynamic map (1 KiB, the same constant for every tensor) counts only
    with include_code_map. bits per parameter = 8 * nbytes(q) / q.size (4.5, or ~4.127, at blocksize 64)."""
    arrays = [q.packed, q.absmax, q.absmax_q, q.absmax_scale, q.offset]
    if include_code_map:
        arrays.append(q.absmax_code)
    return int(sum(a.size * a.dtype.itemsize for a in arrays if a is not None))
