"""The real trainer over two processes: `mixtral-jax train` started twice on localhost, each process with four
simulated CPU devices and nothing but the environment variables a launcher sets (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), trains the tiny model as one 8-device process does: the same losses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from itertools import islice

import pytest

from mixtral_jax.data.texts import read_texts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
OVERRIDES = [f"steps={STEPS}", "batch_size=8", "mesh=data=4,fsdp=2", "log_every=1", "save_every=100",
             "eval_every=0", "data.eval=[]", "progress=false", "async_save=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(run_dir: str, data: str, devices: int, extra_env: dict) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           **extra_env}
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if key not in extra_env:
            env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli", "train", "pretrain_tiny", f"run_dir={run_dir}",
                             f"data.train=[{data}]", *OVERRIDES], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[dict]:
    summaries = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return summaries


def _losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    data = tmp_path / "train.txt"  # a slice of the bundled corpus: tokenising all of it would dominate the test
    data.write_text("\n".join(islice(read_texts("bundled:peoples-daily"), 400)) + "\n", encoding="utf-8")
    port = _free_port()
    pair_dir, single_dir = str(tmp_path / "two"), str(tmp_path / "one")
    procs = [_train(pair_dir, str(data), 4, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                             "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    procs.append(_train(single_dir, str(data), 8, {}))
    *pair, single = _finish(procs)

    assert [s["end_step"] for s in pair] == [STEPS, STEPS] and single["end_step"] == STEPS
    two, one = _losses(pair_dir), _losses(single_dir)
    assert len(one) == STEPS and len(set(one)) > 1  # the loss moves: the steps really trained
    assert two == pytest.approx(one, rel=1e-5, abs=1e-5)
    # the final checkpoint was written once, by both processes together (each saves its own shards)
    assert os.listdir(os.path.join(pair_dir, "checkpoints")) == [str(STEPS)]


@pytest.mark.slow
def test_a_locked_run_directory_stops_both_processes_with_one_error(tmp_path):
    """Process 0 finds the lock of a trainer that still runs (this test's own process) and tells process 1:
    both exit 2 with one line naming why, and the lock is left as it was."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(islice(read_texts("bundled:peoples-daily"), 50)) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "train.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-02T00:00:00Z",
                                "command": "an earlier trainer"}))
    before = lock.read_text()
    port = _free_port()
    procs = [_train(str(run_dir), str(data), 4, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                 "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    try:
        errors = [proc.communicate(timeout=180)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [2, 2], errors
    assert f"the run directory is in use by process {os.getpid()} on host {socket.gethostname()}" in errors[0]
    assert "process 0 could not take the run directory's lock" in errors[1]
    assert all("Traceback" not in err for err in errors)
    assert lock.read_text() == before and not (run_dir / "checkpoints").exists()
