"""The GPU kernels the train step can use, each against what it replaces, at bench-1b's shapes (one GPU).

    python -m bench.bench_gpu_kernels [--batch 8] [--seq 2048] [--json OUT] [--sweep | --tokamax]

* The experts' grouped product: `gmm_gpu.grouped_matmul` (Pallas Mosaic GPU kernels, Hopper) against
  `jax.lax.ragged_dot`, bf16, rows = batch x seq x top-2 routed at random to 8 experts, for w1/w3's shape
  [rows, 1024] x [8, 1024, 3584] and w2's [rows, 3584] x [8, 3584, 1024]: forward and forward + backward
  times, TFLOP/s (the real rows' FLOPs), and the largest difference of product and gradients from the fp32
  reference (ragged_dot accumulated in fp32), relative to the reference's largest magnitude.
* Attention: `implementation="cudnn"` against `"xla"`, causal mask, [B, T, 8 heads, 128] queries over 2 KV
  heads: the same measures.
Prints one JSON object; exits 1 when a difference exceeds bf16's tolerance (2e-2 relative). With `--sweep`,
the grouped products once for each of `SWEEP`'s tile settings (`gmm_gpu.Tiles`) instead: how the tiles were chosen.
With `--tokamax` (extra `gpu`), instead, whether tokamax replaces our kernels: its `ragged_dot` (`gmm_tokamax`,
its Mosaic GPU kernels) as "ours" against `gmm_gpu` as the baseline, at Mixtral-8x7B's widths (8,192 tokens,
[rows, 4096] x [8, 4096, 14336] and back) and at bench-1b's (batch x seq tokens); its `dot_product_attention`
(implementation "mosaic") against `jax.nn.dot_product_attention`'s cuDNN, causal, bf16, 8,192 tokens as
sequences of 2,048 and 4,096, Mixtral's 32 query heads over 8 KV heads of 128.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import median_seconds
from mixtral_jax.kernels import grouped_matmul_gpu as gmm_gpu
from mixtral_jax.kernels import grouped_matmul_tokamax as gmm_tokamax
from mixtral_jax.model.attention import grouped_query_attention

TOLERANCE = 2e-2
EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 8, 2, 1024, 3584, 8, 2, 128
MIXTRAL_TOKENS, MIXTRAL_HIDDEN, MIXTRAL_INTERMEDIATE, MIXTRAL_HEADS, MIXTRAL_KV_HEADS = 8192, 4096, 14336, 32, 8
TOKAMAX_ATTENTION_SEQS = (2048, 4096)
SWEEP = [dict(block_k=k, pipeline_steps=steps, grid_block_n=n, block_m=m) for k, steps, n, m in (
    (64, 4, 1, 128), (64, 4, 2, 128), (64, 6, 2, 128), (128, 4, 2, 128), (64, 4, 4, 128), (64, 3, 2, 128),
    (128, 3, 1, 128), (64, 4, 2, 64))]


def _loss_and_grads(fn, *args):
    """Forward and forward + backward of sum(fn(*args) * cotangent), as jitted callables."""
    cotangent = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape, jnp.bfloat16)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) * cotangent.astype(jnp.float32))
    return jax.jit(fn), jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))


def _compare(ours, reference) -> float:
    ours = jax.tree.leaves(ours)
    reference = jax.tree.leaves(reference)
    return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                     / jnp.maximum(jnp.max(jnp.abs(b.astype(jnp.float32))), 1e-30))
               for a, b in zip(ours, reference))


def _measure(name, candidate, baseline, reference, args, flops, repeats):
    """Times candidate and baseline (forward; forward + backward), compares both with the fp32 reference."""
    row = {"name": name}
    ref_forward, ref_both = _loss_and_grads(reference, *args)
    expected = (ref_forward(*args), ref_both(*args)[1])
    for label, fn in (("ours", candidate), ("baseline", baseline)):
        forward, both = _loss_and_grads(fn, *args)
        row[f"{label}_rel_diff"] = _compare((forward(*args), both(*args)[1]), expected)
        row[f"{label}_forward_ms"] = 1e3 * median_seconds(lambda: jax.block_until_ready(forward(*args)), repeats)
        row[f"{label}_train_ms"] = 1e3 * median_seconds(lambda: jax.block_until_ready(both(*args)), repeats)
        row[f"{label}_forward_tflops"] = flops / row[f"{label}_forward_ms"] / 1e9
        row[f"{label}_train_tflops"] = 3 * flops / row[f"{label}_train_ms"] / 1e9
    row["forward_speedup"] = row["baseline_forward_ms"] / row["ours_forward_ms"]
    row["train_speedup"] = row["baseline_train_ms"] / row["ours_train_ms"]
    print(f"{name}: ours {row['ours_forward_ms']:.2f} / {row['ours_train_ms']:.2f} ms, baseline "
          f"{row['baseline_forward_ms']:.2f} / {row['baseline_train_ms']:.2f} ms (forward / forward+backward); "
          f"rel diff {row['ours_rel_diff']:.1e} vs {row['baseline_rel_diff']:.1e}", flush=True)
    return row


def grouped_products(tokens: int, repeats: int, widths=(HIDDEN, INTERMEDIATE), ours=gmm_gpu.grouped_matmul,
                     baseline=jax.lax.ragged_dot, label: str = "") -> list[dict]:
    """`ours` against `baseline` (each `fn(rows, weights, group_sizes)`) on both of the experts' products."""
    hidden, intermediate = widths
    rows = tokens * TOP_K
    keys = jax.random.split(jax.random.key(0), 4)
    experts = jax.random.randint(keys[0], (rows,), 0, EXPERTS)
    sizes = jnp.bincount(experts, length=EXPERTS).astype(jnp.int32)
    results = []
    for name, k, n in (("experts w1/w3", hidden, intermediate), ("experts w2", intermediate, hidden)):
        x = jax.random.normal(keys[1], (rows, k), jnp.bfloat16)
        w = (jax.random.normal(keys[2], (EXPERTS, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
        reference = lambda x, w: jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
        results.append(_measure(label + name, lambda x, w: ours(x, w, sizes), lambda x, w: baseline(x, w, sizes),
                                reference, (x, w), 2 * rows * k * n, repeats))
    return results


def attention(batch: int, seq: int, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, seq, HEADS, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16) for key in keys[1:])
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq))
    reference = lambda q, k, v: grouped_query_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                        v.astype(jnp.float32), mask)
    flops = 4 * batch * seq * seq * HEADS * HEAD_DIM / 2  # causal: half of QK^T and PV
    return _measure("attention (causal)", lambda q, k, v: grouped_query_attention(q, k, v, mask, "cudnn"),
                    lambda q, k, v: grouped_query_attention(q, k, v, mask, "xla"), reference, (q, k, v),
                    flops, repeats)


def tokamax_products(tokens: int, widths, label: str, repeats: int) -> list[dict]:
    """tokamax's ragged_dot (as gmm_tokamax calls it) against gmm_gpu, both products at these widths."""
    hidden, intermediate = widths
    kind = gmm_tokamax.implementation(*(jax.ShapeDtypeStruct(shape, jnp.bfloat16)
                                        for shape in ((1, hidden), (EXPERTS, hidden, intermediate))))
    rows = grouped_products(tokens, repeats, widths, gmm_tokamax.grouped_matmul, gmm_gpu.grouped_matmul,
                            f"tokamax vs gmm_gpu, {label} ")
    return [{**row, "tokamax_implementation": kind} for row in rows]


def tokamax_attention(seq: int, repeats: int) -> dict:
    """tokamax's Mosaic GPU flash attention against cuDNN's, both told the mask is causal."""
    tokamax = gmm_tokamax.load_tokamax()
    batch = max(1, MIXTRAL_TOKENS // seq)
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (batch, seq, MIXTRAL_HEADS, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, seq, MIXTRAL_KV_HEADS, HEAD_DIM), jnp.bfloat16) for key in keys[1:])
    reference = lambda q, k, v: jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)),
                                                             is_causal=True, implementation="xla")
    flops = 4 * batch * seq * seq * MIXTRAL_HEADS * HEAD_DIM / 2
    return _measure(f"tokamax vs cudnn, attention (causal) seq {seq}",
                    lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic"),
                    lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
                    reference, (q, k, v), flops, repeats)


def tokamax_runs(batch: int, seq: int, repeats: int) -> list:
    """Each a callable -> rows, run on its own (one failing to build must not hide the others' figures)."""
    return [lambda: tokamax_products(MIXTRAL_TOKENS, (MIXTRAL_HIDDEN, MIXTRAL_INTERMEDIATE), "mixtral-8x7b", repeats),
            lambda: tokamax_products(batch * seq, (HIDDEN, INTERMEDIATE), "bench-1b", repeats),
            *(lambda s=s: [tokamax_attention(s, repeats)] for s in TOKAMAX_ATTENTION_SEQS)]


def sweep(tokens: int, repeats: int) -> list[dict]:
    """The grouped products under each tile setting; a setting the GPU cannot hold (shared memory) is noted."""
    rows = []
    for setting in SWEEP:
        gmm_gpu.TILES = dataclasses.replace(gmm_gpu.Tiles(), **setting)
        try:
            rows.append({**setting, "products": grouped_products(tokens, repeats)})
        except Exception as error:  # e.g. "Mosaic GPU kernel exceeds available shared memory"
            rows.append({**setting, "error": f"{type(error).__name__}: {str(error)[:300]}"})
    gmm_gpu.TILES = gmm_gpu.Tiles()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--sweep", action="store_true", help="time the grouped products under each tile setting")
    parser.add_argument("--tokamax", action="store_true",
                        help="tokamax's ragged_dot against gmm_gpu and its attention against cuDNN's, instead")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    result = {"device": device.device_kind, "jax": jax.__version__, "batch": args.batch, "seq": args.seq,
              "kernels": []}
    runs = [lambda: grouped_products(args.batch * args.seq, args.repeats),
            lambda: [attention(args.batch, args.seq, args.repeats)]]
    if args.sweep:
        result["sweep"], runs = sweep(args.batch * args.seq, args.repeats), []
    elif args.tokamax:
        runs = tokamax_runs(args.batch, args.seq, args.repeats)
    for run in runs:
        try:
            result["kernels"].extend(run())
        except Exception as error:  # one kernel failing to build must not hide the others' figures
            print(f"bench_gpu_kernels: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            result.setdefault("errors", []).append(f"{type(error).__name__}: {str(error)[:2000]}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    checked = result["kernels"] + [row for setting in result.get("sweep", []) for row in setting.get("products", [])]
    failed = result.get("errors") or any(row["ours_rel_diff"] > TOLERANCE for row in checked)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
