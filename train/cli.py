"""`mixtral-jax train CONFIG [key=value ...]` runs or resumes a training run; `mixtral-jax plan ...` prints the
per-device memory of a train step, from compiling it on a simulated mesh."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from mixtral_jax.settings import add_settings_arguments

_CHILD = "MIXTRAL_JAX_PLAN_CHILD"  # set in the re-run, so that it never re-runs itself again


def register(commands) -> None:
    register_train(commands)
    register_plan(commands)


def register_train(commands) -> None:
    p = commands.add_parser(
        "train", help="run or resume a training run (pre-training or SFT, LoRA/QLoRA or full)",
        description="Trains as CONFIG says (a YAML file or a preset of train/configs: pretrain, sft, "
                    "pretrain_tiny, sft_tiny). A run_dir that holds a checkpoint resumes from it (from the "
                    "newest that restores; changes that break an exact resume need resume.allow_changes=[KEY,...] "
                    "and are recorded in RUN_DIR/changes.jsonl); one trainer at a time holds a run_dir "
                    "(RUN_DIR/train.lock). `--keys` lists every key with its default and meaning.")
    add_settings_arguments(p, None, "run_dir=runs/x steps=100 data.seq_len=512")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from mixtral_jax.settings import config_and_overrides, keys_text
    from train.config import TrainConfig, load_config

    if args.keys:
        print(keys_text(TrainConfig))
        return 0
    config_path, overrides = config_and_overrides(args.config, args.overrides, None)
    if not config_path:
        raise ValueError("a CONFIG (YAML file or preset name) is required")
    from train.loop import TrainingDiverged, train

    config = load_config(config_path, overrides)
    try:
        summary = train(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    except TrainingDiverged as err:
        print(f"mixtral-jax train: {err}", file=sys.stderr)
        return 3
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def register_plan(commands) -> None:
    p = commands.add_parser(
        "plan", help="per-device memory of a train step, compiled (not run) on a simulated CPU mesh",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Lowers and compiles the real-size train step on N simulated CPU devices (N: the mesh "
                    "spec's product, or --devices) and prints the per-device bytes of parameters, optimizer "
                    "state and temporaries, checked against a hand count, and which chips they fit.")
    p.add_argument("--preset", default="mixtral-8x7b", help="config preset (mixtral_jax/presets/NAME.yaml)")
    p.add_argument("--mesh", default="fsdp=2,expert=4",
                   help="mesh spec axis=size over data, fsdp, expert, tensor (-1 only with --devices)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
    p.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--devices", type=int, default=None, help="simulated devices (default: the mesh's product)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw"])
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--qlora", action="store_true",
                       help="plan QLoRA: the paper's adapters (r 64, alpha 128, all 8 targets) over an NF4 base")
    modes.add_argument("--lora", action="store_true",
                       help="plan LoRA: the same adapters over the base in its own dtype (default: full fine-tuning)")
    p.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16", "param"],
                   help="dtype of AdamW's mu and nu ('param': the parameters' dtype, optax's default)")
    p.add_argument("--master-dtype", default="float32", choices=["float32", "param"],
                   help="dtype the trained weights are held in: fp32 master weights beside the bf16 compute copy "
                        "('param': the model's own dtype)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the plan as JSON to OUT ('-': stdout "
                                                               "instead of the table)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. remat_policy=dots)")
    p.set_defaults(run=run)


def _argv(args) -> list[str]:
    argv = ["plan", "--preset", args.preset, "--mesh", args.mesh, "--batch", str(args.batch), "--seq",
            str(args.seq), "--optimizer", args.optimizer, "--state-dtype", args.state_dtype,
            "--master-dtype", args.master_dtype]
    if args.devices is not None:
        argv += ["--devices", str(args.devices)]
    if args.json is not None:
        argv += ["--json", args.json]
    argv += ["--qlora"] if args.qlora else ["--lora"] if args.lora else []
    return argv + list(args.overrides)


def _rerun(args, count: int) -> int:
    """Runs this plan again in a fresh interpreter whose jax starts with `count` CPU devices."""
    from train.plan import with_device_count

    env = {**os.environ, _CHILD: "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), count)}
    return subprocess.run([sys.executable, "-m", "mixtral_jax.cli", *_argv(args)], env=env).returncode


def run(args) -> int:
    import jax
    from jax._src import xla_bridge

    from mixtral_jax.config import MixtralConfig, parse_overrides
    from mixtral_jax.model.lora import LoraConfig
    from mixtral_jax.parallel.sharding import MeshError, mesh_device_count
    from train.config import OptimizerConfig
    from train.plan import PlanRequest, ensure_cpu_devices, format_plan, plan

    config = MixtralConfig.from_preset(args.preset, parse_overrides(args.overrides))
    count = mesh_device_count(args.mesh, args.devices)
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # a simulation: never take an accelerator a job may be using
    devices = ensure_cpu_devices(count)
    if devices is None:
        if os.environ.get(_CHILD):
            raise MeshError(f"could not start {count} simulated CPU devices (XLA_FLAGS="
                            f"{os.environ.get('XLA_FLAGS', '')!r})")
        return _rerun(args, count)

    def progress(message):
        print(message, file=sys.stderr, flush=True)

    request = PlanRequest(config, args.mesh, args.batch, args.seq,
                          optimizer=OptimizerConfig(state_dtype=args.state_dtype, master_dtype=args.master_dtype),
                          qlora=LoraConfig() if args.qlora or args.lora else None, quantize=not args.lora,
                          preset=args.preset, overrides=args.overrides)
    result = plan(request, devices=devices, progress=progress)
    if args.json == "-":
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_plan(result))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result.to_json(), f, indent=2)
                f.write("\n")
    if not result.hand["matches"]:
        print(f"mixtral-jax plan: warning: compiled arguments ({result.bytes['arguments']} bytes) differ from the "
              f"hand count ({result.hand['arguments']} bytes) by {100 * result.hand['relative_difference']:.1f}%",
              file=sys.stderr)
    return 0
