"""`mixtral-jax convert ...`: checkpoint conversions."""

from __future__ import annotations

from mixtral_jax.cli.main import HelpFormatter, dtype_option
from mixtral_jax.config import list_presets


def _dtype_argument(parser) -> None:
    parser.add_argument("--dtype", default="keep", type=dtype_option("keep"),
                        help="dtype of the written weights: keep (the source's), float32, bfloat16 or float16 "
                             "(also bf16, fp32, fp16)")


def _output_arguments(parser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def register(commands) -> None:
    parser = commands.add_parser("convert", help="create and convert checkpoints")
    sub = parser.add_subparsers(dest="convert_command", required=True)
    for add_command in (_add_init, _add_export_peft, _add_import_peft, _add_hf_to_orbax, _add_orbax_to_hf,
                        _add_verify):
        add_command(sub)


def _add_init(sub) -> None:
    presets = list_presets()
    init = sub.add_parser("init", help="write a randomly initialised model as an HF directory",
                          formatter_class=HelpFormatter,
                          description="Initialises a preset's model in float32 from --seed (weights normal(0.02), "
                                      "norms one) and writes it in --dtype. Config overrides (key=value, values "
                                      "as YAML) may come before or after the options.")
    init.add_argument("out", metavar="OUT", help="output HF directory")
    init.add_argument("--preset", default="tiny", choices=presets, metavar="NAME",
                      help=f"model configuration (mixtral_jax/presets/NAME.yaml): {', '.join(presets)}")
    init.add_argument("--seed", type=int, default=0, help="random seed of the initial weights")
    init.add_argument("--dtype", default="float32", type=dtype_option(),
                      help="dtype of the written weights: float32, bfloat16 or float16 (also bf16, fp32, fp16)")
    init.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    init.add_argument("overrides", nargs="*", metavar="key=value",
                      help="config field overrides, e.g. vocab_size=32768 num_hidden_layers=4 (default: none, "
                           "the preset as it is)")
    init.set_defaults(run=run_init, trailing_positional="overrides")


def _add_export_peft(sub) -> None:
    export = sub.add_parser("export-peft", help="write a LoRA training run's adapters as a PEFT adapter directory")
    export.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (LoRA)")
    export.add_argument("out", help="output adapter directory")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=run_export_peft)


def _add_import_peft(sub) -> None:
    load = sub.add_parser("import-peft", help="load a PEFT adapter directory onto an HF base and summarise it")
    load.add_argument("adapter_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    load.add_argument("--base", required=True, help="HF base model directory")
    load.add_argument("--check", action="store_true",
                      help="also run the adapted model on a few tokens and check its logits are finite")
    load.set_defaults(run=run_import_peft)


def _add_hf_to_orbax(sub) -> None:
    to_orbax = sub.add_parser(
        "hf-to-orbax", formatter_class=HelpFormatter,
        help="stream an HF safetensors directory (legacy or fused layout) into an Orbax model checkpoint",
        description="Reads the HF checkpoint tensor by tensor (peak host memory: a few of its largest per-layer "
                    "tensors) and writes an Orbax model checkpoint that from_pretrained restores onto any mesh.")
    to_orbax.add_argument("hf_dir", metavar="HF_DIR")
    to_orbax.add_argument("out", metavar="OUT")
    _dtype_argument(to_orbax)
    to_orbax.add_argument("--quantize", default="none", choices=["none", "nf4", "nf4-plain"],
                          help="nf4: store the decoder's linear weights as packed NF4 (the QLoRA base) with "
                               "bitsandbytes' double quantisation of the scales (~4.127 bits per parameter); "
                               "nf4-plain: with fp32 scales (4.5 bits)")
    to_orbax.add_argument("--mesh", default=None, metavar="SPEC",
                          help="store each array in chunks of one device's shard on this mesh (e.g. "
                               "fsdp=8,expert=4, every size given), as Orbax saves arrays sharded there: "
                               "restoring onto it reads only each device's chunks; any mesh can restore it")
    _output_arguments(to_orbax)
    to_orbax.set_defaults(run=run_hf_to_orbax)


def _add_orbax_to_hf(sub) -> None:
    to_hf = sub.add_parser(
        "orbax-to-hf", formatter_class=HelpFormatter,
        help="write an Orbax model checkpoint or a training run as an HF directory (legacy per-expert layout)",
        description="SRC is an Orbax model checkpoint (streamed layer by layer) or a training run directory. "
                    "A LoRA run needs --merge: its adapters are folded into the base (W + B A * alpha / r in "
                    "fp32, then cast); merging loads the whole model in memory for now. Writes config.json, "
                    "generation_config.json, sharded safetensors with model.safetensors.index.json, and the "
                    "tokenizer files the source has.")
    to_hf.add_argument("src", metavar="SRC")
    to_hf.add_argument("out", metavar="OUT")
    _dtype_argument(to_hf)
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB = 5*10^9 bytes)")
    to_hf.add_argument("--merge", action="store_true", help="fold a LoRA run's adapters into the base")
    to_hf.add_argument("--base", default=None,
                       help="HF directory of the full-precision base to merge onto (default: the run's base)")
    to_hf.add_argument("--merge-base", default="full", choices=["full", "nf4"],
                       help="merge onto the full-precision base, or onto the dequantised NF4 base of a QLoRA run")
    _output_arguments(to_hf)
    to_hf.set_defaults(run=run_orbax_to_hf)


def _add_verify(sub) -> None:
    check = sub.add_parser(
        "verify", formatter_class=HelpFormatter,
        help="compare two checkpoints (HF dirs, Orbax model dirs, training runs) tensor by tensor",
        description="Prints the largest absolute difference of the 10 most different tensors (HF names) and "
                    "overall; exit status 0 when within --atol (identical by default), 1 otherwise.")
    check.add_argument("a", metavar="A")
    check.add_argument("b", metavar="B")
    check.add_argument("--atol", type=float, default=0.0, help="largest absolute difference accepted")
    check.add_argument("--top", type=int, default=10, help="tensors listed")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(run=run_verify)


def run_init(args) -> int:
    from convert.init import init_random

    path = init_random(args.out, args.preset, seed=args.seed, dtype=args.dtype, overrides=args.overrides,
                       overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def run_export_peft(args) -> int:
    """The run's latest adapters and modules_to_save, the base named (resolved) in adapter_config.json."""
    import os

    from mixtral_jax.checkpoints import run_manifest as runs
    from mixtral_jax.checkpoints.peft import save_peft_adapter
    from mixtral_jax.checkpoints.pretrained import from_pretrained
    from mixtral_jax.errors import CheckpointError

    run_model = runs.read_manifest(args.run_dir)
    if run_model.lora is None:
        raise CheckpointError(f"{args.run_dir}: a full fine-tuning run has no adapters to export "
                              f"(its model is an HF checkpoint)")
    model = from_pretrained(args.run_dir)
    base = os.path.abspath(runs.base_path(run_model.base))
    save_peft_adapter(model, args.out, run_model.modules_to_save, base, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def run_import_peft(args) -> int:
    import json
    import os

    import jax.numpy as jnp
    import numpy as np

    from mixtral_jax.checkpoints.peft import (
        WEIGHTS_FILE,
        load_peft_adapter,
        read_adapter_config,
    )
    from mixtral_jax.io.safetensors_files import SafetensorsFile

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


def run_hf_to_orbax(args) -> int:
    import json

    from convert.orbax_hf import hf_to_orbax

    summary = hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, quantize=args.quantize, mesh=args.mesh,
                          overwrite=args.overwrite, show_progress=not args.quiet)
    print(json.dumps({"wrote": args.out, **summary}))
    return 0


def run_orbax_to_hf(args) -> int:
    from convert.orbax_hf import orbax_to_hf

    orbax_to_hf(args.src, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, merge=args.merge,
                base=args.base, merge_base=args.merge_base, overwrite=args.overwrite, show_progress=not args.quiet)
    print(f"wrote {args.out}")
    return 0


def run_verify(args) -> int:
    from convert.orbax_hf import verify

    return verify(args.a, args.b, atol=args.atol, top=args.top, as_json=args.json)
