"""The `mixtral-jax` console script. Each application registers its own subcommands from its folder."""

from __future__ import annotations

import argparse
import sys

from mixtral_jax.config import ConfigError
from mixtral_jax.safetensors_io import CheckpointError
from mixtral_jax.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, CheckpointError, TokenizerError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    from bench.cli import register as register_bench
    from convert.cli import register as register_convert
    from convert.vocab_cli import register as register_vocab
    from eval.cli import register as register_eval
    from mixtral_jax.generate_cli import register as register_generate
    from pipeline.cli import register as register_pipeline
    from train.cli import register as register_train

    parser = argparse.ArgumentParser(prog="mixtral-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    register_generate(commands)
    register_convert(commands)
    register_train(commands)
    register_bench(commands)
    register_eval(commands)
    register_pipeline(commands)
    register_vocab(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as err:  # bad input: one clear line, no traceback wall
        print(f"mixtral-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
