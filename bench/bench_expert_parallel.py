"""The MoE layer with its experts split over 8 simulated CPU devices against the same layer on one device.

    python -m bench.bench_expert_parallel [--tokens 2048] [--repeats 10] [--json OUT]

For the `dropless` (shard_map, explicit all-to-all) and `capacity` (GSPMD) backends on the bench-moe layer
shape (hidden 512, intermediate 1024, 8 experts, top-2), fp32: the forward time of one MoE layer on the mesh
`expert=8` and on one device, their ratio, and the all-to-all bytes per token read off the compiled program
(the sum of every all-to-all result, per device, times the devices, over the tokens) against the ideal
`hidden x 2 directions x dtype bytes` per token (x top-k when each assignment travels on its own).

Eight simulated devices share this machine's two cores, so the mesh cannot be faster here; the figures show
the cost of the dispatch machinery and the traffic a real pod would carry.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.moe import SparseMoE
from mixtral_jax.parallel.sharding import (
    make_mesh,
    named_sharding,
    shard_model,
    use_mesh,
)

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def all_to_all_bytes(hlo_text: str) -> int:
    """Bytes moved by the all-to-all ops of a compiled, partitioned module (per device)."""
    total = 0
    for line in hlo_text.splitlines():
        if " all-to-all(" not in line or "=" not in line:
            continue
        result = line.split("=", 1)[1].split(" all-to-all(", 1)[0]  # one shape, or a tuple of shapes
        for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", result):
            total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def time_call(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(backend: str, tokens: int, repeats: int) -> dict:
    config = MixtralConfig.from_preset("bench-moe", {"moe_backend": backend, "capacity_factor": 1.25})
    batch, seq = tokens // 256, 256
    x = jax.random.normal(jax.random.key(0), (batch, seq, config.hidden_size))
    single = SparseMoE(config, rngs=nnx.Rngs(0))
    one_device = nnx.jit(lambda moe, x: moe(x)[0])
    t_single = time_call(one_device, single, x, repeats=repeats)

    mesh = make_mesh("expert=8", config=config)
    sharded = shard_model(SparseMoE(config, rngs=nnx.Rngs(0)), mesh)
    x_sharded = jax.device_put(x, named_sharding(("batch", "length", "act_embed"), x.shape, mesh))

    @nnx.jit
    def on_mesh(moe, x):
        with use_mesh(mesh):
            return moe(x)[0]

    t_mesh = time_call(on_mesh, sharded, x_sharded, repeats=repeats)
    difference = float(jnp.max(jnp.abs(on_mesh(sharded, x_sharded) - one_device(single, x))))
    graphdef, state = nnx.split(sharded)

    def pure(state, x):
        with use_mesh(mesh):
            return nnx.merge(graphdef, state)(x)[0]

    hlo = jax.jit(pure).lower(state, x_sharded).compile().as_text()
    moved = all_to_all_bytes(hlo) * mesh.size / tokens
    ideal = config.hidden_size * 2 * 4
    return {"backend": backend, "tokens": tokens, "one_device_ms": t_single * 1e3, "mesh_ms": t_mesh * 1e3,
            "mesh_over_one_device": t_mesh / t_single, "all_to_all_bytes_per_token": moved,
            "ideal_bytes_per_token": ideal, "ideal_top_k_bytes_per_token": ideal * config.num_experts_per_tok,
            "ratio_to_ideal_top_k": moved / (ideal * config.num_experts_per_tok), "max_abs_difference": difference}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [bench(backend, args.tokens, args.repeats) for backend in ("dropless", "capacity")]
    print(f"MoE layer (bench-moe shape), {args.tokens} tokens, fp32, mesh expert=8 on {jax.device_count()} "
          f"simulated CPU devices vs one device; {os.cpu_count()} cores")
    print("| backend | one device ms | mesh ms | mesh / one | all-to-all B/token | ideal x top-k B/token | "
          "ratio to ideal | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['one_device_ms']:.1f} | {r['mesh_ms']:.1f} | {r['mesh_over_one_device']:.2f} | "
              f"{r['all_to_all_bytes_per_token']:,.0f} | {r['ideal_top_k_bytes_per_token']:,} | "
              f"{r['ratio_to_ideal_top_k']:.1f} | {r['max_abs_difference']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
