"""The `mixtral-jax` console script: a parser whose subcommands are registered by the applications.

Each application (train, convert, eval, pipeline, bench, and the library's own `generate`) names a
`register(subparsers)` function in pyproject.toml's `mixtral_jax.commands` entry-point group, so the library
never imports an application: it finds them through the installed distribution's metadata.

What every command shares is here: the one-line reports of bad input (exit 2), of a disk that refuses the
output (full, read-only, no permission: exit 1) and of Ctrl-C (exit 130); `dtype_option`, the `--dtype` type;
`HelpFormatter`; and `key=value` arguments after a command's options (`convert init OUT --preset tiny k=v`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from importlib.metadata import entry_points
from typing import Callable

from mixtral_jax.config import DTYPE_ALIASES, DTYPES, canonical_dtype
from mixtral_jax.errors import CheckpointError, ConfigError, TokenizerError

COMMAND_GROUP = "mixtral_jax.commands"
USER_ERRORS = (ConfigError, CheckpointError, TokenizerError, FileNotFoundError, ValueError)
# Errors of the machine rather than of the input: reported as one line (the path and the cause), exit 1.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
MOE_BACKEND_HELP = ("how the experts are computed: dropless (each token's chosen experts only, in grouped matrix "
                    "products), dense (every expert on every token, then weighted: the reference, slowest), "
                    "capacity (at most a fixed number of tokens per expert, the rest dropped)")
DTYPE_HELP = "parameter and compute dtype: float32, bfloat16 or float16 (also bf16, fp32, fp16)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default at the end of its help, unless the help already says it ("default: ...")."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default:" in text.lower() or "%(default)" in text:
            return text
        return super()._get_help_string(action)


def dtype_option(*words: str) -> Callable[[str], str]:
    """The `type=` of a `--dtype` option: a canonical name (float32, bfloat16, float16) from any spelling
    `config.canonical_dtype` accepts (bf16, fp32, ...), or one of `words` as given ("keep")."""

    def dtype(text: str) -> str:
        if text in words:
            return text
        try:
            return canonical_dtype(text, "dtype")
        except ConfigError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {', '.join((*words, *DTYPES))} (or "
                                             f"{', '.join(DTYPE_ALIASES)})") from None

    return dtype


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


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, except that a command that sets `trailing_positional=NAME` (the dest of its `nargs="*"`
    positional) also gets the `key=value` arguments that follow its options: argparse fills a positional only
    once, so `convert init OUT --preset tiny vocab_size=64` would otherwise refuse `vocab_size=64`."""
    args, extra = parser.parse_known_args(argv)
    trailing = getattr(args, "trailing_positional", None)
    if extra and (trailing is None or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, trailing, [*(getattr(args, trailing) or []), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:  # Ctrl-C: the outputs clean themselves up on the way out (io/output_dir.py)
        _report(args, "interrupted")
        return INTERRUPTED
    except USER_ERRORS as err:  # bad input: one clear line, no traceback wall
        _report(args, f"error: {err}")
        return 2
    except OSError as err:
        if err.errno not in DISK_ERRNOS:
            raise
        _report(args, f"error: {disk_error(err)}")
        return 1


def disk_error(err: OSError) -> str:
    """'PATH: no space left on device' (read-only file system, permission denied, ...)."""
    cause = os.strerror(err.errno)
    cause = cause[:1].lower() + cause[1:]
    return f"{err.filename}: {cause}" if err.filename is not None else cause


def _report(args: argparse.Namespace, message: str) -> None:
    print(f"mixtral-jax {args.command}: {message}", file=sys.stderr)
