"""Multi-host on one machine: two processes, four simulated CPU devices each, one 8-device mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from mixtral_jax.parallel.distributed import host_rows

WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, optax
    from flax import nnx
    import mixtral_jax as mj
    from mixtral_jax.parallel import distributed, sharding
    from train.step import make_train_step

    process_id, port = int(sys.argv[1]), sys.argv[2]
    assert distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    config = mj.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                              num_experts_per_tok=2, moe_backend="capacity", capacity_factor=4.0)
    model = mj.Mixtral(config, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(sys.argv[3], config=config)
    ids = np.random.default_rng(0).integers(0, 64, (8, 8)).astype(np.int32)
    rows = distributed.host_rows(8)
    step = make_train_step(model, optax.sgd(0.1), mesh, ids.shape)
    local = {"input_ids": ids[rows], "labels": ids[rows], "attention_mask": np.ones_like(ids[rows])}
    batch = distributed.global_batch(local, step.batch_shardings, 8)
    sharding.shard_model(model, mesh)
    params, frozen = step.split(model)
    grads, metrics = step.grads(params, batch, frozen, None)
    norm = jax.jit(lambda g: optax.tree.norm(g), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(grads)
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                      "local_devices": jax.local_device_count(), "rows": [rows.start, rows.stop],
                      "loss": float(metrics["loss"]), "grad_norm": float(norm)}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_single(spec):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code = WORKER.replace('assert distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)',
                          "assert not distributed.initialize()")
    out = subprocess.run([sys.executable, "-c", code, "0", "0", spec], env=env, capture_output=True, text=True,
                         timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_two_processes_compute_what_one_process_does():
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(port), "data=2,expert=4"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    single = _run_single("data=2,expert=4")
    assert [r["rows"] for r in results] == [[0, 4], [4, 8]]
    for r in results:
        assert (r["devices"], r["local_devices"]) == (8, 4)
        assert r["loss"] == pytest.approx(single["loss"], abs=1e-5)
        assert r["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)


def test_host_rows_are_disjoint_and_cover_the_batch():
    rows = [host_rows(12, i, 4) for i in range(4)]
    covered = [r for s in rows for r in range(s.start, s.stop)]
    assert covered == list(range(12))
    with pytest.raises(ValueError, match="not divisible"):
        host_rows(10, 0, 4)
