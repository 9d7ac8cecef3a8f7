"""The run directory's lock: one holder, refusals naming host and pid, a dead holder's lock taken over, release
on exceptions and SIGTERM, and the lease on gs:// (a local GCS emulator)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mixtral_jax.checkpoints import run_lock
from mixtral_jax.checkpoints.run_lock import LOCK_FILE, RunDirLocked, RunLock, held
from tests.helpers.gcs_emulator import fake_gcs


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_holder(run_dir, **fields):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "id": "other", "started": "2026-01-01T00:00:00Z",
              "command": "mixtral-jax train elsewhere", **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))
    return holder


def test_the_lock_file_names_its_holder_and_a_second_taker_is_refused_with_host_and_pid(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
    with pytest.raises(RunDirLocked, match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = RunLock(str(tmp_path))
    second.acquire()  # free again
    second.release()


def test_a_live_process_lock_is_refused_and_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = _write_holder(tmp_path, pid=sleeper.pid)
        with pytest.raises(RunDirLocked, match=f"process {sleeper.pid} on host {socket.gethostname()}"):
            RunLock(str(tmp_path)).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == holder
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_process_lock_on_this_host_is_taken_over_with_a_log_line(tmp_path):
    dead = _dead_pid()
    _write_holder(tmp_path, pid=dead)
    messages = []
    lock = RunLock(str(tmp_path), log=messages.append)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and f"taking over the lock of process {dead}" in messages[0]
    assert "no longer running" in messages[0]
    lock.release()
    assert os.listdir(tmp_path) == []


def test_another_hosts_lock_is_refused_even_with_a_pid_not_running_here(tmp_path):
    _write_holder(tmp_path, host="other-host", pid=_dead_pid())
    with pytest.raises(RunDirLocked, match="on host other-host"):
        RunLock(str(tmp_path)).acquire()


def test_held_releases_on_an_exception_and_on_sigterm(tmp_path):
    with pytest.raises(KeyError):
        with held(str(tmp_path), log=lambda _: None):
            assert (tmp_path / LOCK_FILE).exists()
            raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    received = []

    def recorder(signum, frame):  # stands for the default action (the process ends), which a test cannot take
        received.append(signum)

    before = signal.signal(signal.SIGTERM, recorder)
    try:
        with held(str(tmp_path), log=lambda _: None):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(200):
                if received:
                    break
                time.sleep(0.01)
            assert received == [signal.SIGTERM]  # passed on to the handler before, once the lock was given back
            assert not (tmp_path / LOCK_FILE).exists()
        assert signal.getsignal(signal.SIGTERM) is recorder
    finally:
        signal.signal(signal.SIGTERM, before)


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path):
    lock = RunLock(str(tmp_path))
    lock.acquire()
    holder = _write_holder(tmp_path, id="someone-else")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == holder


@pytest.mark.slow
def test_on_gs_a_lease_refuses_a_second_taker_and_an_expired_one_is_taken_over(monkeypatch):
    monkeypatch.setattr(run_lock, "SETTLE_SECONDS", 0.1)
    monkeypatch.setattr(run_lock, "RENEW_SECONDS", 0.2)
    with fake_gcs() as bucket:
        import fsspec

        fs = fsspec.filesystem("gcs")
        run_dir = f"{bucket}/run"
        lock = RunLock(run_dir)
        lock.acquire()
        first = json.loads(fs.cat(f"{run_dir}/{LOCK_FILE}"))
        time.sleep(0.6)  # renewed meanwhile
        renewed = json.loads(fs.cat(f"{run_dir}/{LOCK_FILE}"))
        assert renewed["id"] == first["id"] and renewed["renewed_unix"] > first["renewed_unix"]
        with pytest.raises(RunDirLocked, match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
            RunLock(run_dir).acquire()
        lock.release()
        assert not fs.exists(f"{run_dir}/{LOCK_FILE}")

        expired = {**first, "id": "gone", "host": "preempted-vm", "pid": 7, "renewed_unix": time.time() - 1000}
        fs.pipe(f"{run_dir}/{LOCK_FILE}", json.dumps(expired).encode())
        messages = []
        lock = RunLock(run_dir, log=messages.append)
        lock.acquire()
        assert "taking over the lease of process 7 on host preempted-vm" in messages[0]
        assert json.loads(fs.cat(f"{run_dir}/{LOCK_FILE}"))["id"] == lock.holder["id"]
        lock.release()
