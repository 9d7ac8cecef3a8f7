"""The train command's configuration: every key declared once, with its type, default and a line of help
(`mixtral-jax train --keys` prints them), read by `mixtral_jax.settings` (strict YAML, dotted overrides).

The `lora` section extends the library's LoraConfig and the `optimizer` section is the config the optimizer
factory takes, so neither is copied field by field into another schema (importing LoraConfig imports JAX)."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from mixtral_jax.errors import ConfigError
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.settings import load_settings, plain, setting, setting_list

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = setting("bundled:tiny", "base model: an HF or Orbax model directory, a training run (staged "
                                        "runs), or bundled:tiny (the packaged tiny model)")
    dtype: Literal["float32", "bfloat16"] = setting("bfloat16", "dtype of the base weights and of compute")
    quantize: Literal["none", "nf4", "nf4-plain"] = setting("nf4", "nf4: store the frozen base in 4 bits (QLoRA), its block "
                                                      "scales double-quantised as bitsandbytes' "
                                                      "bnb_4bit_use_double_quant (~4.127 bits per parameter); "
                                                      "nf4-plain: fp32 block scales (4.5 bits); a base "
                                                      "already in NF4 (an Orbax nf4 or nf4-plain "
                                                      "checkpoint) is kept as stored")
    tokenizer: str | None = setting(None, "tokenizer file or directory (default: the base model's own, else "
                                          "Mixtral's from mistral-common)")
    implementation: dict = dataclasses.field(
        default_factory=dict, metadata={"help": "model implementation fields (moe_backend, remat_policy, "
                                                "scan_layers, capacity_factor, ...), see MixtralConfig"})


@dataclasses.dataclass(frozen=True)
class LoraSection(LoraConfig):
    """The library's LoraConfig (rank, alpha, dropout, targets: declared there, once) plus what only a training
    run decides: whether adapters train at all, and which weights train in full beside them."""

    enabled: bool = setting(True, "train LoRA adapters over a frozen base (false: full fine-tuning)")
    modules_to_save: tuple[str, ...] = setting_list(
        ("embed_tokens", "lm_head"), "weights trained in full beside the adapters (peft's modules_to_save)")

    def manifest_fields(self) -> dict | None:
        """The LoraConfig fields a run's manifest (`RunModel.lora`) records; None for full fine-tuning."""
        if not self.enabled:
            return None
        return plain({f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: Literal["pretrain", "sft"] = setting("pretrain",
                                               "pretrain: raw text cut into blocks; sft: instruction pairs")
    train: tuple[str, ...] = setting_list((), "training sources: .txt/.jsonl files, directories, hf:NAME, tfds:NAME, "
                                              "bundled:NAME (sft: Alpaca JSON/JSONL or bundled:NAME)")
    eval: tuple[str, ...] = setting_list((), "held-out sources, scored at the start, every eval_every steps and "
                                             "at the end")
    replay: tuple[str, ...] = setting_list((), "pre-training: sources mixed in beside `train` (the language the "
                                               "model already knows, so that it keeps it)")
    replay_share: float = setting(0.0, "pre-training: share of the training sequences taken from `replay`, its "
                                       "blocks repeated as needed", min=0, max=0.9)
    seq_len: int = setting(1024, "tokens per sequence (pre-training block size; SFT maximum length)", min=2)
    group_lines: int = setting(1000, "pre-training: lines concatenated before cutting blocks, as datasets.map "
                                     "batches them in run_clm", min=1)
    text_field: str = setting("text", "the text field of JSON lines and datasets")
    packing: bool = setting(False, "sft: pack several samples into one sequence (no attention across them)")
    eval_rows: int = setting(64, "at most this many held-out sequences are scored", min=1)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The paper's optimizer settings, and the very config `train.optim.make_optimizer` takes (the number of
    steps it schedules over is computed at run time and passed beside it)."""

    learning_rate: float = setting(1e-4, "peak learning rate", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay", min=0)
    warmup_ratio: float = setting(0.05, "linear warmup as a share of the steps, then cosine decay to 0",
                                  min=0, max=0.99)
    max_grad_norm: float = setting(1.0, "global gradient-norm clipping", min=0)
    b1: float = setting(0.9, "AdamW beta1", min=0, max=1)
    b2: float = setting(0.999, "AdamW beta2", min=0, max=1)
    eps: float = setting(1e-8, "AdamW epsilon", min=0)
    state_dtype: Literal["float32", "bfloat16", "param"] = setting(
        "float32", "dtype of AdamW's mu and nu, whatever the parameters' dtype (param: the parameters' own, "
                   "optax's default)")
    master_dtype: Literal["float32", "param"] = setting(
        "float32", "dtype the trained weights are held and updated in: float32 master weights beside the "
                   "model's (bf16) compute copy, as MaxText and Megatron hold them; param: the model's own "
                   "dtype (a bf16 run then loses updates below bf16's resolution)")


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
    allow_changes: tuple[str, ...] = setting_list(
        (), "keys a resume may change although exact resume breaks (data.seq_len, batch_size, optimizer.*, ...: "
            "see train/resume.py); each change is recorded in RUN_DIR/changes.jsonl")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str | None = setting(None, "run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints")
    seed: int = setting(0, "seed of the adapters' initialisation, data order and dropout")
    steps: int = setting(0, "optimizer steps (0: `epochs` passes over the training data)", min=0)
    epochs: float = setting(1.0, "passes over the training data when steps is 0", min=0)
    stop_at_step: int = setting(0, "end this process after this step, saving first (0: run to the end); the "
                                   "schedule still spans `steps`, so a later run continues it (jobs with time limits)",
                                min=0)
    batch_size: int = setting(8, "sequences per optimizer step, over all hosts (the paper: 1152)", min=1)
    micro_batches: int = setting(1, "the batch runs as this many sequential micro-batches (gradient accumulation)",
                                 min=1)
    mesh: str = setting("fsdp=-1", "device mesh over data, fsdp, expert, tensor (e.g. fsdp=2,expert=4)")
    aux_loss_coef: float = setting(0.02, "router load-balancing loss coefficient", min=0)
    save_every: int = setting(100, "checkpoint every N steps (and at the end, on SIGTERM)", min=1)
    keep_checkpoints: int = setting(3, "checkpoints kept (older ones are deleted)", min=1)
    async_save: bool = setting(True, "write checkpoints in the background while training goes on")
    log_every: int = setting(10, "write metrics every N steps", min=1)
    eval_every: int = setting(0, "score the held-out data every N steps (0: only at the start and the end)", min=0)
    peak_tflops: float | None = setting(None, "per-device peak TFLOP/s for MFU (default: known chips' bf16 peak, "
                                              "else a measured matmul)", min=0)
    progress: bool = setting(True, "show a progress bar")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    resume: ResumeConfig = dataclasses.field(default_factory=ResumeConfig)

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))


def load_config(path: str, overrides: list[str] = ()) -> TrainConfig:
    """The YAML file (or a preset name from train/configs/) with `section.key=value` overrides on top."""
    config, source = load_settings(TrainConfig, path, overrides, preset_dir=CONFIG_DIR)
    if not config.run_dir:
        raise ConfigError(f"{source}: key 'run_dir' is required")
    if not config.data.train:
        raise ConfigError(f"{source}: key 'data.train' needs at least one source")
    if config.batch_size % config.micro_batches:
        raise ConfigError(f"{source}: key 'batch_size' ({config.batch_size}) must be divisible by "
                          f"'micro_batches' ({config.micro_batches})")
    return config
