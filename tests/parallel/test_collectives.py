"""Collective bytes per device, counted in the partitioned HLO of small programs on 8 simulated devices whose
traffic is known by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixtral_jax.parallel.collectives import (
    KINDS,
    collective_bytes,
    compile_partitioned,
    retarget,
    shape_bytes,
)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(jax.devices()[:8], ("x",))


def sharded(mesh, shape, spec, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def counted(lowered) -> dict[str, int]:
    return collective_bytes(compile_partitioned(lowered)[1])


def only(**counts) -> dict[str, int]:
    return {kind: counts.get(kind.replace("-", "_"), 0) for kind in KINDS}


def per_device(mesh, body, in_specs=P("x"), out_specs=P("x")):
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def test_shape_bytes_reads_the_width_off_the_dtype_name():
    assert shape_bytes("bf16[4,8]{1,0}") == 64
    assert shape_bytes("(f32[2]{0}, s4[16]{0}, pred[3]{0})") == 8 + 8 + 3
    assert shape_bytes("f8e4m3fn[10]") == 10 and shape_bytes("f32[]") == 4


def test_partitioner_collectives_of_jit_with_shardings(mesh):
    """A replicated result of a sharded array is all-gathered (each device ends with the whole 64 x 16); a
    product contracted over the sharded dimension is summed across devices: a reduce-scatter when the result
    stays sharded, an all-reduce when it is replicated. Either way each device puts in its full 64 x 32 partial."""
    replicated = NamedSharding(mesh, P())
    gather = jax.jit(lambda x: x * 2, out_shardings=replicated).lower(sharded(mesh, (64, 16), P("x")))
    assert counted(gather) == only(all_gather=64 * 16 * 4)
    a, b = sharded(mesh, (64, 128), P(None, "x")), sharded(mesh, (128, 32), P("x"))
    scatter = jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P("x"))).lower(a, b)
    assert counted(scatter) == only(reduce_scatter=64 * 32 * 4)
    assert counted(jax.jit(jnp.matmul, out_shardings=replicated).lower(a, b)) == only(all_reduce=64 * 32 * 4)


def test_explicit_collectives_in_shard_map_in_their_own_dtype(mesh):
    """psum of a device's 8 x 16 block, a reduce-scatter when each device keeps only its share of the sum; a
    tiled all-to-all of its 8 x 16 block, in bf16 as the program has it (XLA:CPU's later passes widen bf16
    collectives to fp32: the count is taken before them); a psum within groups of one device moves nothing."""
    psum = jax.jit(per_device(mesh, lambda x: jax.lax.psum(x, "x")))
    assert counted(psum.lower(sharded(mesh, (64, 16), P("x")))) == only(all_reduce=8 * 16 * 4)
    kept = jax.jit(per_device(mesh, lambda x: jax.lax.psum(x, "x"), out_specs=P()),
                   out_shardings=NamedSharding(mesh, P("x")))
    assert counted(kept.lower(sharded(mesh, (64, 16), P("x")))) == only(reduce_scatter=8 * 16 * 4)
    exchange = jax.jit(per_device(mesh, lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True)))
    assert counted(exchange.lower(sharded(mesh, (64, 16), P("x"), jnp.bfloat16))) == only(all_to_all=8 * 16 * 2)
    columns = Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("x", "y"))
    alone = jax.shard_map(lambda x: jax.lax.psum(x, "y"), mesh=columns, in_specs=P("x"), out_specs=P("x"),
                          check_vma=False)
    assert counted(jax.jit(alone).lower(sharded(columns, (32, 16), P("x")))) == only()


def test_a_loop_counts_per_iteration_and_its_invariants_once(mesh):
    """A scan of 5 steps, each a psum of the carry (f32 4 x 16 per device) and of a constant (bf16 4 x 16): the
    constant's psum is the same every step, which XLA hoists out of the loop, so it counts once."""
    def body(x, w):
        def step(carry, _):
            return carry + jax.lax.psum(carry, "x") + jax.lax.psum(w, "x").astype(carry.dtype), None
        return jax.lax.scan(step, x, None, length=5)[0]

    program = jax.jit(per_device(mesh, body, in_specs=(P("x"), P("x"))))
    lowered = program.lower(sharded(mesh, (32, 16), P("x")), sharded(mesh, (32, 16), P("x"), jnp.bfloat16))
    assert counted(lowered) == only(all_reduce=5 * 4 * 16 * 4 + 4 * 16 * 2)


def test_a_loop_whose_trip_count_depends_on_data_is_refused(mesh):
    def body(x):
        return jax.lax.while_loop(lambda c: c.sum() < 100.0, lambda c: c + jax.lax.psum(c, "x"), x)

    lowered = jax.jit(per_device(mesh, body)).lower(sharded(mesh, (32, 16), P("x")))
    with pytest.raises(ValueError, match="trip count depends on data"):
        collective_bytes(lowered.as_text(dialect="hlo"))


def _ragged(x, output):
    """Each device sends all its rows to device 0 (offsets and sizes per destination)."""
    rows = x.shape[0]
    sizes = jnp.zeros(8, jnp.int32).at[0].set(rows)
    return jax.lax.ragged_all_to_all(x, output, jnp.zeros(8, jnp.int32), sizes, jnp.zeros(8, jnp.int32),
                                     sizes, axis_name="x")


@pytest.mark.parametrize("rows, capacity", [(8, 32), (32, 8)])
def test_ragged_all_to_all_counts_the_smaller_of_its_buffers(mesh, rows, capacity):
    """Lowered for TPU (XLA:CPU has no ragged all-to-all): a device sends at most its operand and receives at
    most its output, so the smaller of the two (here 8 rows of 16 f32) bounds the mean traffic."""
    program = jax.jit(per_device(mesh, lambda x: _ragged(x, jnp.zeros((capacity, 16), x.dtype))))
    lowered = program.trace(sharded(mesh, (8 * rows, 16), P("x"))).lower(lowering_platforms=("tpu",))
    assert collective_bytes(lowered.as_text(dialect="hlo")) == only(all_to_all=8 * 16 * 4)


def test_retarget_takes_the_explicit_exchange_of_the_target_platform(mesh):
    """One program, two exchanges picked when lowering: on CPU an all-to-all of padded blocks (8 x the rows),
    on TPU the ragged all-to-all. Its bytes for TPU are the partitioner's collectives compiled here (the
    all-gather of the replicated second output) plus the TPU lowering's exchange."""
    def padded(x):
        return jax.lax.all_to_all(jnp.broadcast_to(x, (8, *x.shape)), "x", 0, 0, tiled=True).sum(0)

    def exchange(x):
        return jax.lax.platform_dependent(x, cpu=padded, default=lambda x: _ragged(x, jnp.zeros_like(x)))

    program = jax.jit(lambda x: (per_device(mesh, exchange)(x), x),
                      out_shardings=(NamedSharding(mesh, P("x")), NamedSharding(mesh, P())))
    traced = program.trace(sharded(mesh, (64, 16), P("x")))
    here = traced.lower()
    partitioned = compile_partitioned(here)[1]
    assert collective_bytes(partitioned) == only(all_to_all=8 * 8 * 16 * 4, all_gather=64 * 16 * 4)
    there = traced.lower(lowering_platforms=("tpu",)).as_text(dialect="hlo")
    assert retarget(partitioned, here.as_text(dialect="hlo"), there) == only(all_to_all=8 * 16 * 4,
                                                                              all_gather=64 * 16 * 4)


def test_a_program_on_one_device_is_its_lowered_module():
    one = Mesh(jax.devices()[:1], ("x",))
    lowered = jax.jit(lambda x: x * 2).lower(sharded(one, (8, 16), P("x")))
    compiled, text = compile_partitioned(lowered)
    assert text == lowered.as_text(dialect="hlo") and collective_bytes(text) == only()
    assert compiled.memory_analysis() is not None
