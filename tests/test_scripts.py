"""The repository's shell scripts: shellcheck-clean, and the GPU benchmark refuses a machine without a GPU
with one clear line instead of timing a CPU."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "**", "*.sh"), recursive=True))
SCRIPTS = [s for s in SCRIPTS if "/.venv/" not in s]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: os.path.relpath(s, REPO))
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    result = subprocess.run([shellcheck, "--severity=style", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_gpu_benchmark_needs_a_gpu():
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2 and "sees no GPU" in result.stderr
