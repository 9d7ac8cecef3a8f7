"""`mixtral-jax convert ...`: checkpoint conversions."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    p = commands.add_parser("convert", help="create and convert checkpoints")
    sub = p.add_subparsers(dest="convert_command", required=True)
    init = sub.add_parser("init", help="write a randomly initialised model as an HF directory",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    init.add_argument("out", help="output HF directory")
    init.add_argument("--preset", default="tiny")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    init.add_argument("--overwrite", action="store_true")
    init.add_argument("overrides", nargs="*", help="config overrides key=value")
    init.set_defaults(run=run_init)

    export = sub.add_parser("export-peft", help="write a LoRA training run's adapters as a PEFT adapter directory")
    export.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (LoRA)")
    export.add_argument("out", help="output adapter directory")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=run_export_peft)

    load = sub.add_parser("import-peft", help="load a PEFT adapter directory onto an HF base and summarise it")
    load.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    load.add_argument("--base", required=True, help="HF base model directory")
    load.add_argument("--check", action="store_true",
                      help="also run the adapted model on a few tokens and check its logits are finite")
    load.set_defaults(run=run_import_peft)


def run_init(args) -> int:
    from convert.init import init_random

    path = init_random(args.out, args.preset, seed=args.seed, dtype=args.dtype, overrides=args.overrides,
                       overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def run_export_peft(args) -> int:
    """The run's latest adapters and modules_to_save, the base named (resolved) in adapter_config.json."""
    import os

    from mixtral_jax import checkpoint
    from mixtral_jax.hf_checkpoint import from_pretrained
    from mixtral_jax.peft_adapters import save_peft_adapter
    from mixtral_jax.safetensors_io import CheckpointError

    run_model = checkpoint.read_manifest(args.run_dir)
    if run_model.lora is None:
        raise CheckpointError(f"{args.run_dir}: a full fine-tuning run has no adapters to export "
                              f"(its model is an HF checkpoint)")
    model = from_pretrained(args.run_dir)
    base = os.path.abspath(checkpoint.base_path(run_model.base))
    save_peft_adapter(model, args.out, run_model.modules_to_save, base, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def run_import_peft(args) -> int:
    import json
    import os

    import jax.numpy as jnp
    import numpy as np

    from mixtral_jax.peft_adapters import WEIGHTS_FILE, load_peft_adapter, read_adapter_config
    from mixtral_jax.safetensors_io import SafetensorsFile

    lora, modules_to_save = read_adapter_config(args.adapter_dir)
    model = load_peft_adapter(args.base, args.adapter_dir)
    summary = {"adapter_dir": args.adapter_dir, "base": args.base,
               "tensors": len(SafetensorsFile(os.path.join(args.adapter_dir, WEIGHTS_FILE)).keys()),
               "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
               "target_modules": list(lora.targets), "modules_to_save": list(modules_to_save)}
    if args.check:
        ids = jnp.arange(8, dtype=jnp.int32)[None] % model.config.vocab_size
        logits = np.asarray(model(ids).logits, np.float32)
        summary["logits_finite"] = bool(np.isfinite(logits).all())
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("logits_finite", True) else 1
