"""Typed settings files: frozen dataclasses read from YAML, with dotted `key=value` overrides.

An application declares its keys once, as dataclass fields with a type, a default and a line of help
(`setting`, `setting_list`); `load_settings` reads a YAML file strictly (an unknown key, a value of the wrong
type or out of range is one error naming the file and the dotted key) and `describe_settings` lists every key
for a `--keys` option. `mixtral-jax train` and `mixtral-jax pipeline` read their configs this way.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Mapping

import yaml

from mixtral_jax.config import parse_overrides
from mixtral_jax.errors import ConfigError


def setting(default, help: str, **limits):
    """A field with its line of help; `min=` / `max=` bound numbers."""
    return dataclasses.field(default=default, metadata={"help": help, **limits})


def setting_list(default, help: str):
    return dataclasses.field(default_factory=lambda: tuple(default), metadata={"help": help})


def plain(value):
    """Dataclass dicts and tuples as plain YAML/JSON values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


_SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
            str: (str, "a string")}


def _coerce(value, annotation, where: str):
    """`value` as `annotation` (the field's type), or a ConfigError naming `where`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in items)
    if annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation in _SCALARS:
        accepted, wording = _SCALARS[annotation]
        if isinstance(value, bool) != (annotation is bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where} must be {wording}, got {value!r}")
        return annotation(value)
    raise TypeError(f"unsupported settings type {annotation}")


def build_settings(cls, values: Mapping[str, Any], source: str, prefix: str = ""):
    """An instance of the dataclass `cls` from a mapping, checked key by key."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known under "
                          f"'{prefix.rstrip('.') or 'top level'}': {', '.join(fields)})")
    kwargs = {}
    for name, value in values.items():
        where = f"{source}: key '{prefix}{name}'"
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_settings(hints[name], value or {}, source, f"{prefix}{name}.")
            continue
        value = _coerce(value, hints[name], where)
        meta = fields[name].metadata
        if value is not None and "min" in meta and value < meta["min"]:
            raise ConfigError(f"{where} must be >= {meta['min']}, got {value!r}")
        if value is not None and "max" in meta and value > meta["max"]:
            raise ConfigError(f"{where} must be <= {meta['max']}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def resolve_preset(path: str, preset_dir: str) -> str:
    """A YAML path, or the name of a preset in `preset_dir` (with or without .yaml)."""
    if os.path.isfile(path):
        return path
    name = path if path.endswith(".yaml") else f"{path}.yaml"
    candidate = os.path.join(preset_dir, name)
    if os.path.isfile(candidate):
        return candidate
    presets = sorted(f[:-5] for f in os.listdir(preset_dir) if f.endswith(".yaml"))
    raise ConfigError(f"{path}: no such config file or preset (presets: {', '.join(presets)})")


def load_settings(cls, path: str, overrides: list[str] = (), preset_dir: str | None = None):
    """The YAML file (or preset name) as `cls`, with `section.key=value` overrides applied on top.
    Returns (settings, source), the source naming the file for later errors."""
    source = resolve_preset(path, preset_dir) if preset_dir else path
    if not os.path.isfile(source):
        raise ConfigError(f"{source}: no such config file")
    with open(source, encoding="utf-8") as f:
        try:
            values = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    for dotted, value in parse_overrides(list(overrides)).items():
        _set_dotted(values, dotted, value)
    if overrides:
        source = f"{source} (with overrides)"
    return build_settings(cls, values, source), source


def describe_settings(settings, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key of a settings class (or of an instance, whose values are
    then the defaults shown): the documentation a `--keys` option prints."""
    if isinstance(settings, type):
        settings = settings()
    rows = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_settings(value, f"{prefix}{f.name}.")
            continue
        rows.append((f"{prefix}{f.name}", yaml.safe_dump(plain(value), default_flow_style=True).strip()
                     .removesuffix("...").strip(), f.metadata["help"]))
    return rows


def keys_text(settings) -> str:
    """`describe_settings` as aligned lines: `key  help [default: value]`."""
    rows = describe_settings(settings)
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"{key:<{width}}  {help_text} [default: {default}]" for key, default, help_text in rows)


def add_settings_arguments(parser, default: str | None, example: str) -> None:
    """CONFIG (a YAML file or preset name), dotted key=value overrides, and --keys, for a command's parser."""
    parser.add_argument("config", nargs="?", default=default, help="YAML file or preset name")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example}")
    parser.add_argument("--keys", action="store_true", help="list every config key, its default and meaning, and exit")


def config_and_overrides(config: str | None, overrides: list[str], default: str | None) -> tuple[str, list[str]]:
    """argparse gives the first override as CONFIG when no CONFIG was named: it then joins the overrides."""
    if config is not None and "=" in config:
        return default, [config, *overrides]
    return config, list(overrides)
