"""One trainer per run directory: `RUN_DIR/train.lock` names the process that holds it (host, pid, start
time, command), so that a second `mixtral-jax train` on the same directory is refused at once instead of
writing the same checkpoints.

Local (or any POSIX) directory: the lock file is created with O_CREAT | O_EXCL, which only one process can
win. A lock left by a process that died (same host, pid no longer running) is taken over with a log line; a
lock of another host cannot be checked from here and is refused (remove the file if that host's trainer is
gone).

gs:// directory: object stores have no exclusive create through `mixtral_jax.io.paths` (epath opens no 'x'
mode), so the lock there is a lease: an object holding a timestamp that the holder renews every
RENEW_SECONDS from a background thread. A lease not renewed for LEASE_SECONDS (a holder killed without
cleaning up) is taken over; after writing its own lease a starter waits SETTLE_SECONDS and reads it back, and
gives up if another starter's lease replaced it. Limitation: two starts within the same moment can still
both read back their own lease (the upload is not conditional), and the lease trusts the hosts' clocks.

A multi-host run's processes share one lock: process 0 takes it and tells the others whether it got it.
The lock is released when the `held` context ends, also on an exception, and on SIGTERM before the signal
takes its course (the process ends as it would without the lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

from mixtral_jax.errors import ConfigError
from mixtral_jax.io import paths

LOCK_FILE = "train.lock"
LEASE_SECONDS = 120.0     # gs://: a lease not renewed for this long is taken over
RENEW_SECONDS = 30.0      # gs://: how often the holder renews its lease
SETTLE_SECONDS = 2.0      # gs://: the wait before a starter reads back the lease it wrote


class RunDirLocked(ConfigError):
    """Another process trains in this run directory; the message names its host and pid."""


def _holder(remote: bool) -> dict:
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex,
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "started_unix": now,
              "command": " ".join(sys.argv)[:500]}
    if remote:
        holder.update(renewed_unix=now, lease_seconds=LEASE_SECONDS)
    return holder


def _read_holder(path: str) -> dict | None:
    """The lock's holder, None when there is no lock; {} when its content is not (yet) a holder."""
    try:
        with paths.open_binary(path) as f:
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started "
            f"{holder.get('started', '?')}: {holder.get('command', '?')})")


def _busy(path: str, holder: dict) -> RunDirLocked:
    if not holder:
        return RunDirLocked(f"{path}: the run directory is locked (the lock file is unreadable; remove it if no "
                            f"trainer runs there)")
    return RunDirLocked(f"{path}: the run directory is in use by {_describe(holder)}; wait for it to end, or "
                        f"remove {LOCK_FILE} if that process is gone")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process (or an odd pid): assume it runs
    return True


def _stale(holder: dict) -> bool:
    """A lock of this host whose process is gone; another host's processes cannot be checked from here."""
    return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def _create_exclusive(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return True


def _remove_stale(path: str, holder: dict) -> None:
    """Moves the stale lock aside and deletes it; if what was moved is not that lock (another starter took it
    over in between), it goes back unless a newer lock is already there."""
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_holder(aside) != holder and not os.path.exists(path):
        os.rename(aside, path)
        return
    os.unlink(aside)


class RunLock:
    """The lock of one run directory, taken by `acquire` and given back by `release`."""

    def __init__(self, run_dir: str, log=print):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.remote = paths.is_remote(run_dir)
        self.log = log
        self.holder: dict | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        (self._acquire_remote if self.remote else self._acquire_local)()

    def _acquire_local(self) -> None:
        for attempt in range(20):
            holder = _holder(remote=False)
            if _create_exclusive(self.path, json.dumps(holder) + "\n"):
                self.holder = holder
                return
            found = _read_holder(self.path)
            if found is None or (not found and attempt < 10):  # released meanwhile, or still being written
                time.sleep(0.05)
                continue
            if not _stale(found):
                raise _busy(self.path, found)
            self.log(f"{self.path}: taking over the lock of {_describe(found)}, which is no longer running")
            _remove_stale(self.path, found)
        raise RunDirLocked(f"{self.path}: could not take the lock (other processes keep taking it)")

    def _acquire_remote(self) -> None:
        found = _read_holder(self.path)
        if found is not None:
            age = time.time() - float(found.get("renewed_unix", 0))
            if age < float(found.get("lease_seconds", LEASE_SECONDS)):
                raise _busy(self.path, found)
            self.log(f"{self.path}: taking over the lease of {_describe(found)}, not renewed for {age:.0f} s")
        holder = _holder(remote=True)
        paths.write_text(self.path, json.dumps(holder) + "\n")
        time.sleep(SETTLE_SECONDS)
        found = _read_holder(self.path)
        if not found or found.get("id") != holder["id"]:
            raise _busy(self.path, found or {})
        self.holder = holder
        self._renewer = threading.Thread(target=self._renew, name="run-lock-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                found = _read_holder(self.path)
                if not found or found.get("id") != self.holder["id"]:
                    self.log(f"{self.path}: warning: the lease was taken over by {_describe(found or {})}")
                    return
                self.holder = {**self.holder, "renewed_unix": time.time()}
                paths.write_text(self.path, json.dumps(self.holder) + "\n")
            except OSError as err:  # a network hiccup: try again at the next renewal
                self.log(f"{self.path}: warning: could not renew the lease ({err})")

    def release(self) -> None:
        """Removes the lock if it is still this process's."""
        if self.holder is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        found = _read_holder(self.path)
        if found and found.get("id") == self.holder["id"]:
            paths.as_path(self.path).unlink()
        self.holder = None


@contextlib.contextmanager
def _released_on_sigterm(lock: RunLock | None):
    """While held (main thread only), SIGTERM first gives the lock back, then goes to the handler that was
    there before (by default: the process ends, as without the lock). Unwinding the stack from the handler
    instead (SystemExit) can crash the interpreter's exit while XLA is busy. The training loop installs its
    own handler (finish the step, save, return) inside this."""
    def release_then_resignal(signum, frame):
        if lock is not None:
            lock.release()
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)

    installed, previous = False, signal.SIG_DFL
    try:
        previous = signal.signal(signal.SIGTERM, release_then_resignal)
        installed = True
    except ValueError:  # not the main thread: no handler, released when the block ends
        pass
    if previous is None:  # a handler installed outside Python: the default stands in for it
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _agree(taken: bool) -> bool:
    """Process 0's outcome, given to every process of a multi-host run."""
    import jax

    if jax.process_count() == 1:
        return taken
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))


@contextlib.contextmanager
def held(run_dir: str, log=print):
    """The run directory's lock for the duration of the block: process 0 takes it for all processes."""
    import jax

    lock = RunLock(run_dir, log) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as err:  # noqa: BLE001 - whatever it is, the other processes must hear of it first
            error = err
    if not _agree(error is None):
        raise error or RunDirLocked(f"{os.path.join(run_dir, LOCK_FILE)}: process 0 could not take the run "
                                    f"directory's lock (its log says who holds it)")
    try:
        with _released_on_sigterm(lock):
            yield lock
    finally:
        if lock is not None:
            lock.release()


__all__ = ["LEASE_SECONDS", "LOCK_FILE", "RENEW_SECONDS", "SETTLE_SECONDS", "RunDirLocked", "RunLock", "held"]
