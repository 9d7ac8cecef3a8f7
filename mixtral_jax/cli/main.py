"""The `mixtral-jax` console script: a parser whose subcommands are registered by the applications.

Each application (train, convert, eval, pipeline, bench, and the library's own `generate`) names a
`register(subparsers)` function in pyproject.toml's `mixtral_jax.commands` entry-point group, so the library
never imports an application: it finds them through the installed distribution's metadata.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from mixtral_jax.errors import CheckpointError, ConfigError, TokenizerError

COMMAND_GROUP = "mixtral_jax.commands"
USER_ERRORS = (ConfigError, CheckpointError, TokenizerError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    registered = sorted(entry_points(group=COMMAND_GROUP), key=lambda point: point.name)
    if not registered:
        raise SystemExit(f"mixtral-jax: no commands are registered (entry-point group {COMMAND_GROUP!r}); "
                         f"install the package (pip install -e .)")
    for point in registered:
        point.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as err:  # bad input: one clear line, no traceback wall
        print(f"mixtral-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
