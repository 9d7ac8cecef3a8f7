"""The train command's configuration: frozen dataclasses read from YAML, with dotted `key=value` overrides.

Every key is declared here once, with its type, default and a line of help (`mixtral-jax train --keys`
prints them). Reading is strict: an unknown key, a value of the wrong type or out of range is one error
naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Mapping

import yaml

from mixtral_jax.config import ConfigError, parse_overrides

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def _key(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _list(default, help: str):
    return dataclasses.field(default_factory=lambda: tuple(default), metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = _key("bundled:tiny", "base model: an HF directory, or bundled:tiny (the packaged tiny model)")
    dtype: Literal["float32", "bfloat16"] = _key("bfloat16", "dtype of the base weights and of compute")
    quantize: Literal["none", "nf4"] = _key("nf4", "nf4: store the frozen base in 4 bits (QLoRA)")
    tokenizer: str | None = _key(None, "tokenizer file or directory (default: Mixtral's, from mistral-common)")
    implementation: dict = dataclasses.field(
        default_factory=dict, metadata={"help": "model implementation fields (moe_backend, remat_policy, "
                                                "scan_layers, capacity_factor, ...), see MixtralConfig"})


@dataclasses.dataclass(frozen=True)
class LoraSection:
    enabled: bool = _key(True, "train LoRA adapters over a frozen base (false: full fine-tuning)")
    rank: int = _key(64, "adapter rank r", min=1)
    alpha: float = _key(128.0, "scale alpha (the update is alpha / r * x A B)", min=0)
    dropout: float = _key(0.05, "dropout on the adapters' input", min=0, max=0.99)
    targets: tuple[str, ...] = _list(("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", "gate"),
                                     "adapted weights (any of q_proj k_proj v_proj o_proj w1 w2 w3 gate)")
    modules_to_save: tuple[str, ...] = _list(("embed_tokens", "lm_head"),
                                             "weights trained in full beside the adapters (peft's modules_to_save)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: Literal["pretrain", "sft"] = _key("pretrain", "pretrain: raw text cut into blocks; sft: instruction pairs")
    train: tuple[str, ...] = _list((), "training sources: .txt/.jsonl files, directories, hf:NAME, tfds:NAME, "
                                       "bundled:NAME (sft: Alpaca JSON/JSONL or bundled:NAME)")
    eval: tuple[str, ...] = _list((), "held-out sources, scored at the start, every eval_every steps and at the end")
    seq_len: int = _key(1024, "tokens per sequence (pre-training block size; SFT maximum length)", min=2)
    group_lines: int = _key(1000, "pre-training: lines concatenated before cutting blocks, as datasets.map "
                                  "batches them in run_clm", min=1)
    text_field: str = _key("text", "the text field of JSON lines and datasets")
    packing: bool = _key(False, "sft: pack several samples into one sequence (no attention across them)")
    eval_rows: int = _key(64, "at most this many held-out sequences are scored", min=1)


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    learning_rate: float = _key(1e-4, "peak learning rate", min=0)
    weight_decay: float = _key(0.1, "AdamW weight decay", min=0)
    warmup_ratio: float = _key(0.05, "linear warmup as a share of the steps, then cosine decay to 0", min=0, max=0.99)
    max_grad_norm: float = _key(1.0, "global gradient-norm clipping", min=0)
    b1: float = _key(0.9, "AdamW beta1", min=0, max=1)
    b2: float = _key(0.999, "AdamW beta2", min=0, max=1)
    eps: float = _key(1e-8, "AdamW epsilon", min=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str | None = _key(None, "run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints")
    seed: int = _key(0, "seed of the adapters' initialisation, data order and dropout")
    steps: int = _key(0, "optimizer steps (0: `epochs` passes over the training data)", min=0)
    epochs: float = _key(1.0, "passes over the training data when steps is 0", min=0)
    stop_at_step: int = _key(0, "end this process after this step, saving first (0: run to the end); the "
                                "schedule still spans `steps`, so a later run continues it (jobs with time limits)",
                             min=0)
    batch_size: int = _key(8, "sequences per optimizer step, over all hosts (the paper: 1152)", min=1)
    micro_batches: int = _key(1, "the batch runs as this many sequential micro-batches (gradient accumulation)",
                              min=1)
    mesh: str = _key("fsdp=-1", "device mesh over data, fsdp, expert, tensor (e.g. fsdp=2,expert=4)")
    aux_loss_coef: float = _key(0.02, "router load-balancing loss coefficient", min=0)
    save_every: int = _key(100, "checkpoint every N steps (and at the end, on SIGTERM)", min=1)
    keep_checkpoints: int = _key(3, "checkpoints kept (older ones are deleted)", min=1)
    async_save: bool = _key(True, "write checkpoints in the background while training goes on")
    log_every: int = _key(10, "write metrics every N steps", min=1)
    eval_every: int = _key(0, "score the held-out data every N steps (0: only at the start and the end)", min=0)
    peak_tflops: float | None = _key(None, "per-device peak TFLOP/s for MFU (default: known chips' bf16 peak, "
                                           "else a measured matmul)", min=0)
    progress: bool = _key(True, "show a progress bar")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
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
    raise TypeError(f"unsupported config type {annotation}")


def _build(cls, values: Mapping[str, Any], source: str, prefix: str = ""):
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
            kwargs[name] = _build(hints[name], value or {}, source, f"{prefix}{name}.")
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


def resolve_preset(path: str) -> str:
    """A YAML path, or the name of a preset in train/configs/ (with or without .yaml)."""
    if os.path.isfile(path):
        return path
    name = path if path.endswith(".yaml") else f"{path}.yaml"
    candidate = os.path.join(CONFIG_DIR, name)
    if os.path.isfile(candidate):
        return candidate
    presets = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
    raise ConfigError(f"{path}: no such config file or preset (presets: {', '.join(presets)})")


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    """The YAML file (or preset name) with `section.key=value` overrides applied on top."""
    source = resolve_preset(path)
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
    config = _build(TrainConfig, values, source)
    if not config.run_dir:
        raise ConfigError(f"{source}: key 'run_dir' is required")
    if not config.data.train:
        raise ConfigError(f"{source}: key 'data.train' needs at least one source")
    if config.batch_size % config.micro_batches:
        raise ConfigError(f"{source}: key 'batch_size' ({config.batch_size}) must be divisible by "
                          f"'micro_batches' ({config.micro_batches})")
    return config


def describe_keys(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key: the documentation `mixtral-jax train --keys` prints."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_keys(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}{f.name}", yaml.safe_dump(_plain(default), default_flow_style=True).strip()
                     .removesuffix("...").strip(), f.metadata["help"]))
    return rows
