"""The MoE layer with its experts split over 8 simulated CPU devices against the same layer on one device.

    python -m bench.bench_expert_parallel [--tokens 2048] [--repeats 10] [--json OUT]

For the `dropless` (shard_map, explicit all-to-all of fixed buffers) and `capacity` (GSPMD) backends on the
bench-moe layer shape (hidden 512, intermediate 1024, 8 experts, top-2), fp32: the forward time of one MoE layer
on the mesh `expert=8` and on one device, their ratio, and the all-to-all bytes per token read off the compiled
program (the sum of every all-to-all result, per device, times the devices, over the tokens) against the ideal
`hidden x 2 directions x dtype bytes` per token (x top-k when each assignment travels on its own).

The `dropless` exchange over `jax.lax.ragged_all_to_all` (`expert_exchange=ragged`) cannot run here (XLA's CPU
backend has no ragged all-to-all): its bytes are read off the program lowered for TPU, untimed. What a ragged
all-to-all moves depends on the routing, but a device sends at most its operand and receives at most its
output, and all devices together send what they receive: the smaller of the two bounds each op.

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
from mixtral_jax.parallel.collectives import collective_bytes, compile_partitioned
from mixtral_jax.parallel.sharding import (
    make_mesh,
    named_sharding,
    shard_model,
    use_mesh,
)

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "i32": 4, "i1": 1}


def _bytes(dtype: str, dims: list[str]) -> int:
    return _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims if d] or [1]))


def _tensor_bytes(tensor_type: str) -> int:
    """'tensor<16x512xf32>' -> bytes."""
    *dims, dtype = tensor_type[len("tensor<"):-1].split("x")
    return _bytes(dtype, dims)


def ragged_exchange_bytes(stablehlo_text: str) -> int:
    """Bytes a device moves, at most, in the ragged all-to-alls of a lowered (StableHLO) module: per op the
    smaller of its operand and output, plus the all-to-alls (of the row counts and offsets)."""
    total = 0
    for line in stablehlo_text.splitlines():
        if "custom_call @ragged_all_to_all(" in line:
            operand, output = re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)", line).groups()
            total += min(_tensor_bytes(operand), _tensor_bytes(output))
        elif "stablehlo.all_to_all" in line:
            total += _tensor_bytes(re.search(r"-> (tensor<[^>]*>)", line).group(1))
    return total


def time_call(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(config: MixtralConfig, tokens: int):
    """x [tokens / 256, 256, hidden], the mesh `expert=8`, the layer on it and x placed there."""
    x = jax.random.normal(jax.random.key(0), (tokens // 256, 256, config.hidden_size))
    mesh = make_mesh("expert=8", config=config)
    sharded = shard_model(SparseMoE(config, rngs=nnx.Rngs(0)), mesh)
    return x, mesh, sharded, jax.device_put(x, named_sharding(("batch", "length", "act_embed"), x.shape, mesh))


def _traced(mesh, sharded, x_sharded):
    """The layer's forward on the mesh as a pure function of its state, traced."""
    graphdef, state = nnx.split(sharded)

    def pure(state, x):
        with use_mesh(mesh):
            return nnx.merge(graphdef, state)(x)[0]

    return jax.jit(pure).trace(state, x_sharded)


def _row(name: str, config: MixtralConfig, tokens: int, moved: float, **timings) -> dict:
    ideal = config.hidden_size * 2 * 4
    return {"backend": name, "tokens": tokens, "one_device_ms": None, "mesh_ms": None, "mesh_over_one_device": None,
            "max_abs_difference": None, **timings, "all_to_all_bytes_per_token": moved,
            "ideal_bytes_per_token": ideal, "ideal_top_k_bytes_per_token": ideal * config.num_experts_per_tok,
            "ratio_to_ideal_top_k": moved / (ideal * config.num_experts_per_tok)}


def bench(backend: str, tokens: int, repeats: int) -> dict:
    config = MixtralConfig.from_preset("bench-moe", {"moe_backend": backend, "capacity_factor": 1.25,
                                                     "expert_exchange": "padded"})
    x, mesh, sharded, x_sharded = _inputs(config, tokens)
    single = SparseMoE(config, rngs=nnx.Rngs(0))
    one_device = nnx.jit(lambda moe, x: moe(x)[0])
    t_single = time_call(one_device, single, x, repeats=repeats)

    @nnx.jit
    def on_mesh(moe, x):
        with use_mesh(mesh):
            return moe(x)[0]

    t_mesh = time_call(on_mesh, sharded, x_sharded, repeats=repeats)
    difference = float(jnp.max(jnp.abs(on_mesh(sharded, x_sharded) - one_device(single, x))))
    moved = collective_bytes(compile_partitioned(_traced(mesh, sharded, x_sharded).lower())[1])["all-to-all"]
    return _row(backend, config, tokens, moved * mesh.size / tokens, one_device_ms=t_single * 1e3,
                mesh_ms=t_mesh * 1e3, mesh_over_one_device=t_mesh / t_single, max_abs_difference=difference)


def ragged_bytes(tokens: int) -> dict:
    """The dropless layer with the ragged exchange, lowered for TPU (its grouped product too): bytes only."""
    config = MixtralConfig.from_preset("bench-moe", {"moe_backend": "dropless", "expert_exchange": "ragged",
                                                     "grouped_matmul": "ragged_dot"})
    _, mesh, sharded, x_sharded = _inputs(config, tokens)
    text = _traced(mesh, sharded, x_sharded).lower(lowering_platforms=("tpu",)).as_text()
    return _row("dropless, ragged (TPU program)", config, tokens, ragged_exchange_bytes(text) * mesh.size / tokens)


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    padded, capacity = (bench(backend, args.tokens, args.repeats) for backend in ("dropless", "capacity"))
    rows = [padded, ragged_bytes(args.tokens), capacity]
    print(f"MoE layer (bench-moe shape), {args.tokens} tokens, fp32, mesh expert=8 on {jax.device_count()} "
          f"simulated CPU devices vs one device; {os.cpu_count()} cores")
    print("| backend | one device ms | mesh ms | mesh / one | all-to-all B/token | ideal x top-k B/token | "
          "ratio to ideal | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {_cell(r['one_device_ms'], '.1f')} | {_cell(r['mesh_ms'], '.1f')} | "
              f"{_cell(r['mesh_over_one_device'], '.2f')} | {r['all_to_all_bytes_per_token']:,.0f} | "
              f"{r['ideal_top_k_bytes_per_token']:,} | {r['ratio_to_ideal_top_k']:.2f} | "
              f"{_cell(r['max_abs_difference'], '.1e')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
