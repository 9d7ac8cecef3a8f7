"""The repository's shell scripts: shellcheck-clean; the TPU scripts' --dry-run prints exactly the gcloud
commands expected for a slice and runs nothing; and the GPU benchmark refuses a machine without a GPU with
one clear line instead of timing a CPU."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "**", "*.sh"), recursive=True))
SCRIPTS = [s for s in SCRIPTS if "/.venv/" not in s] + [os.path.join(REPO, ".ci", "run")]
TPU = os.path.join(REPO, "tpu_scripts")
TPU_SCRIPTS = sorted(name for name in os.listdir(TPU) if name.endswith(".sh") and name != "lib.sh")
SLICE = ["--name", "zh-pt", "--zone", "us-east5-a", "--project", "my-proj"]
WHERE = "--zone=us-east5-a --project=my-proj"
SSH_ALL = f"gcloud compute tpus tpu-vm ssh zh-pt {WHERE} --worker=all --command"
SETUP = [
    "git archive --format=tar.gz --output=/tmp/mixtral-jax-src.tar.gz HEAD",
    f"gcloud compute tpus tpu-vm scp /tmp/mixtral-jax-src.tar.gz zh-pt:mixtral-jax-src.tar.gz {WHERE} --worker=all",
    f"{SSH_ALL} 'sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv && "
    "mkdir -p mixtral-jax && tar -xzf mixtral-jax-src.tar.gz -C mixtral-jax && python3.11 -m venv "
    "mixtral-jax/.venv && mixtral-jax/.venv/bin/pip install -q -e \"mixtral-jax[gcs]\" \"jax[tpu]==0.10.2\"'",
]
COPY = (f"{SSH_ALL} 'sudo mkdir -p /data/zh-corpus && sudo chown \"$USER\" /data/zh-corpus && "
        "gcloud storage rsync --recursive gs://zh-bucket/corpus /data/zh-corpus'")
MOUNT = (f"{SSH_ALL} 'command -v gcsfuse >/dev/null || {{ echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
         "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" | sudo tee "
         "/etc/apt/sources.list.d/gcsfuse.list && curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
         "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install "
         "-y -q gcsfuse; } && sudo mkdir -p /gcs/zh-bucket && sudo chown \"$USER\" /gcs/zh-bucket && "
         "{ mountpoint -q /gcs/zh-bucket || gcsfuse --implicit-dirs --rename-dir-limit=200000 zh-bucket "
         "/gcs/zh-bucket; }'")
TRAIN = (f"{SSH_ALL} 'setsid nohup mixtral-jax/.venv/bin/mixtral-jax train pretrain run_dir=/gcs/zh-bucket/runs/pt "
         "'\\''data.train=[/data/zh-corpus]'\\'' >mixtral-jax-train.log 2>&1 </dev/null &'")
FOLLOW = f"gcloud compute tpus tpu-vm ssh zh-pt {WHERE} --worker=0 --command 'tail -n 100 -F mixtral-jax-train.log'"
QUEUED_CREATE = [
    f"gcloud compute tpus queued-resources create zh-pt {WHERE} --accelerator-type=v5p-128 "
    "--runtime-version=v2-alpha-tpuv5 --node-id=zh-pt --spot",
    f"gcloud compute tpus queued-resources describe zh-pt {WHERE} '--format=value(state.state)'",
]
TRAIN_ARGS = ["--", "pretrain", "run_dir=/gcs/zh-bucket/runs/pt", "data.train=[/data/zh-corpus]"]
DATA_ARGS = ["--copy", "gs://zh-bucket/corpus=/data/zh-corpus", "--mount", "zh-bucket=/gcs/zh-bucket"]

CASES = {
    "create v4": (["create.sh", *SLICE, "--type", "v4-32"],
                  [f"gcloud compute tpus tpu-vm create zh-pt {WHERE} --accelerator-type=v4-32 "
                   "--version=tpu-ubuntu2204-base"]),
    "create v5e preemptible": (["create.sh", *SLICE, "--type", "v5litepod-16", "--preemptible"],
                               [f"gcloud compute tpus tpu-vm create zh-pt {WHERE} --accelerator-type=v5litepod-16 "
                                "--version=v2-alpha-tpuv5-lite --preemptible"]),
    "create v6e spot": (["create.sh", *SLICE, "--type", "v6e-64", "--spot"],
                        [f"gcloud compute tpus tpu-vm create zh-pt {WHERE} --accelerator-type=v6e-64 "
                         "--version=v2-alpha-tpuv6e --spot"]),
    "create v5p queued spot": (["create.sh", *SLICE, "--type", "v5p-128", "--queued", "--spot"], QUEUED_CREATE),
    "setup": (["setup.sh", *SLICE], SETUP),
    "setup local": (["setup.sh", "--local"],
                    ["python3 -m venv .venv", ".venv/bin/pip install -q -e . 'jax[cuda12]==0.10.2'"]),
    "data": (["data.sh", *SLICE, *DATA_ARGS], [COPY, MOUNT]),
    "train": (["train.sh", *SLICE, "--follow", *TRAIN_ARGS], [TRAIN, FOLLOW]),
    "train local": (["train.sh", "--local", "--env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--", "pretrain",
                     "mesh=fsdp=-1,expert=8"],
                    ["env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 .venv/bin/mixtral-jax train pretrain "
                     "mesh=fsdp=-1,expert=8"]),
    "logs": (["logs.sh", *SLICE, "--worker", "all", "--lines", "20"],
             [f"gcloud compute tpus tpu-vm ssh zh-pt {WHERE} --worker=all --command 'tail -n 20 mixtral-jax-train.log'"]),
    "delete": (["delete.sh", *SLICE], [f"gcloud compute tpus tpu-vm delete zh-pt {WHERE} --quiet"]),
    "delete queued": (["delete.sh", *SLICE, "--queued"],
                      [f"gcloud compute tpus queued-resources delete zh-pt {WHERE} --force --quiet"]),
    "resume": (["resume.sh", *SLICE, "--type", "v5p-128", "--spot", "--queued", *DATA_ARGS, *TRAIN_ARGS],
               [f"gcloud compute tpus tpu-vm describe zh-pt {WHERE} '--format=value(state)'",
                f"gcloud compute tpus queued-resources delete zh-pt {WHERE} --force --quiet",
                *QUEUED_CREATE, *SETUP, COPY, MOUNT, TRAIN]),
}


@pytest.fixture
def no_cloud(tmp_path):
    """A PATH whose gcloud and git only record that they were called: --dry-run must call neither."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "git"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {calls}\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def _script(args, env, check=True):
    result = subprocess.run(["bash", os.path.join(TPU, args[0]), *args[1:]], capture_output=True, text=True,
                            env=env, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dry_run_prints_the_commands(case, no_cloud):
    env, calls = no_cloud
    args, expected = CASES[case]
    result = _script([*args, "--dry-run"] if "--" not in args else
                     [*args[:args.index("--")], "--dry-run", *args[args.index("--"):]], env)
    assert result.stdout.splitlines() == expected
    assert not calls.exists(), "a --dry-run ran a command"
    for line in expected:
        shlex.split(line)  # each line is one well-formed shell command


def test_remote_command_keeps_the_words(no_cloud):
    """The trainer's arguments reach the host's shell as the same words, whatever they contain."""
    env, _ = no_cloud
    odd = ["pretrain", "run_dir=/gcs/b/it's here", "data.train=[/a b, $HOME]"]
    line = _script(["train.sh", *SLICE, "--dry-run", "--", *odd], env).stdout.strip()
    remote = shlex.split(line)[-1]
    words = shlex.split(remote.removeprefix("setsid nohup ").split(" >mixtral-jax-train.log")[0])
    assert words == ["mixtral-jax/.venv/bin/mixtral-jax", "train", *odd]


@pytest.mark.parametrize("script", TPU_SCRIPTS)
def test_help_and_bad_options(script, no_cloud):
    assert script in {args[0] for args, _ in CASES.values()}, f"no --dry-run case for {script}"
    env, _ = no_cloud
    usage = _script([script, "--help"], env).stdout
    assert f"tpu_scripts/{script}" in usage and "--dry-run" in usage
    wrong = _script([script, "--bogus"], env, check=False)
    assert wrong.returncode == 2 and "unknown option --bogus" in wrong.stderr


@pytest.mark.parametrize("args, message", [
    (["create.sh", *SLICE, "--type", "v3-8"], "unknown accelerator type 'v3-8'"),
    (["create.sh", *SLICE, "--type", "v5p-8", "--queued", "--preemptible"], "take --spot, not --preemptible"),
    (["create.sh", "--zone", "z", "--type", "v5p-8"], "--name NAME is required"),
    (["data.sh", *SLICE, "--copy", "/local=/data"], "--copy takes gs://"),
    (["train.sh", *SLICE], "give the trainer's arguments after --"),
])
def test_refusals_name_the_problem(args, message, no_cloud):
    env, calls = no_cloud
    result = _script([*args, "--dry-run"], env, check=False)
    assert result.returncode == 2 and message in result.stderr and not calls.exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: os.path.relpath(s, REPO))
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    result = subprocess.run([shellcheck, "-x", "--severity=style", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_gpu_benchmark_needs_a_gpu():
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2 and "sees no GPU" in result.stderr
