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


def run_init(args) -> int:
    from convert.init import init_random

    path = init_random(args.out, args.preset, seed=args.seed, dtype=args.dtype, overrides=args.overrides,
                       overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
