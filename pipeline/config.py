"""The pipeline command's configuration (read by `mixtral_jax.settings`; `mixtral-jax pipeline --keys`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from mixtral_jax.settings import load_settings, setting, setting_list

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
EMBEDDED = "embedded"


@dataclasses.dataclass(frozen=True)
class EnglishSection:
    steps: int = setting(300, "embedded base only: steps of full training of the bundled tiny model on English",
                         min=1)
    overrides: tuple[str, ...] = setting_list((), "more `mixtral-jax train` overrides for that run")


@dataclasses.dataclass(frozen=True)
class StageData:
    """A training stage's sources, prepared once into stores (stage data) that the run reads."""
    train: tuple[str, ...] = setting_list(("bundled:peoples-daily",), "training sources")
    eval: tuple[str, ...] = setting_list(("bundled:peoples-daily-heldout",), "held-out sources (may be empty)")
    replay: tuple[str, ...] = setting_list((), "pre-training: sources mixed in (set data.replay_share in overrides)")
    seq_len: int = setting(128, "tokens per sequence (the run's data.seq_len)", min=2)


@dataclasses.dataclass(frozen=True)
class TrainStage:
    config: str = setting("pretrain_tiny", "`mixtral-jax train` preset name or YAML file")
    overrides: tuple[str, ...] = setting_list((), "`mixtral-jax train` overrides (model.path, run_dir and the "
                                                  "data sources are set by the pipeline)")
    data: StageData = dataclasses.field(default_factory=StageData)


@dataclasses.dataclass(frozen=True)
class EvalSection:
    lengths: tuple[int, ...] = setting_list((128, 256, 512), "context lengths of the perplexity curves")
    max_windows: int = setting(16, "at most this many windows per length and text", min=1)
    mcq_questions: int = setting(60, "translation multiple-choice questions made from held-out sentences "
                                     "(0: no MCQ)", min=0)
    shots: int = setting(5, "dev examples before each MCQ question", min=0)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    work_dir: str = setting("runs/pipeline", "every stage's output goes under this directory")
    base: str = setting(EMBEDDED, "an HF base model directory, or 'embedded': the bundled tiny model after it "
                                  "learns English (stage english)")
    english: EnglishSection = dataclasses.field(default_factory=EnglishSection)
    pretrain: TrainStage = dataclasses.field(default_factory=TrainStage)
    sft: TrainStage = dataclasses.field(default_factory=lambda: TrainStage(
        config="sft_tiny", data=StageData(train=("bundled:hsk-instructions",),
                                          eval=("bundled:hsk-instructions-heldout",))))
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    export_dtype: Literal["keep", "float32", "bfloat16"] = setting("keep", "dtype of the released HF weights")
    check_atol: float = setting(1e-4, "largest logit difference accepted between transformers and us (fp32)",
                                min=0)


def load_config(path: str, overrides: list[str] = ()) -> PipelineConfig:
    """The YAML file (or a preset name from pipeline/configs/) with `section.key=value` overrides on top."""
    return load_settings(PipelineConfig, path, overrides, preset_dir=CONFIG_DIR)[0]
