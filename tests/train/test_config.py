"""The train command's configuration: presets load, overrides apply, every key is documented, bad input is one
error naming the file and the dotted key."""

from __future__ import annotations

import pytest

from mixtral_jax.cli.main import main
from mixtral_jax.settings import describe_settings
from train.config import CONFIG_DIR, ConfigError, TrainConfig, load_config


@pytest.mark.parametrize("preset", ["pretrain", "sft", "pretrain_tiny", "sft_tiny"])
def test_presets_load(preset):
    config = load_config(preset)
    assert config.run_dir and config.data.train and config.batch_size % config.micro_batches == 0


def test_paper_presets_hold_the_recipe():
    for preset in ("pretrain", "sft"):
        config = load_config(preset)
        assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (64, 128.0, 0.05)
        assert len(config.lora.targets) == 8 and config.lora.modules_to_save == ("embed_tokens", "lm_head")
        assert (config.optimizer.learning_rate, config.optimizer.weight_decay) == (1e-4, 0.1)
        assert config.optimizer.warmup_ratio == 0.05 and config.aux_loss_coef == 0.02
        assert config.batch_size == 1152 and config.data.seq_len == 1024 and config.model.quantize == "nf4"
    assert load_config("pretrain").epochs == 1 and load_config("sft").epochs == 3


def test_dotted_overrides():
    config = load_config("pretrain_tiny", ["run_dir=/tmp/x", "steps=7", "save_every=3", "log_every=2", "seed=5",
                                           "data.seq_len=64", "lora.targets=[q_proj,w1]", "optimizer.learning_rate=3e-4",
                                           "model.implementation.moe_backend=capacity"])
    assert (config.run_dir, config.steps, config.save_every, config.log_every, config.seed) == ("/tmp/x", 7, 3, 2, 5)
    assert config.data.seq_len == 64 and config.lora.targets == ("q_proj", "w1")
    assert config.optimizer.learning_rate == 3e-4 and config.model.implementation == {"moe_backend": "capacity"}


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown key 'stepz'"),
    ("data.seqlen=3", "unknown key 'data.seqlen'"),
    ("steps=ten", "key 'steps' must be an integer"),
    ("save_every=0", "key 'save_every' must be >= 1"),
    ("model.quantize=nf8", "key 'model.quantize' must be one of none, nf4"),
    ("lora.dropout=1.5", "key 'lora.dropout' must be <= 0.99"),
    ("async_save=maybe", "key 'async_save' must be true or false"),
    ("micro_batches=3", "'batch_size' \\(8\\) must be divisible by 'micro_batches' \\(3\\)"),
    ("data.train=[]", "'data.train' needs at least one source"),
])
def test_bad_values_name_the_file_and_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("pretrain_tiny", [override])
    assert "pretrain_tiny.yaml" in str(info.value)


def test_a_bad_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: x\nlora:\n  rank: 8\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'lora.colour'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="no such config file or preset"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_key_is_documented(capsys):
    rows = describe_settings(TrainConfig)
    keys = {key for key, _, _ in rows}
    assert {"run_dir", "steps", "save_every", "log_every", "seed", "data.seq_len", "lora.rank"} <= keys
    assert all(help_text for _, _, help_text in rows)
    assert main(["train", "--keys"]) == 0
    printed = capsys.readouterr().out
    assert all(key in printed for key in keys)
    assert CONFIG_DIR.endswith("configs")


def test_the_lora_section_is_the_librarys_lora_config_and_the_manifest_keeps_its_fields():
    """One declaration of rank, alpha, dropout and targets: the library's LoraConfig, which the section extends;
    a run's manifest records exactly those fields, as before."""
    from mixtral_jax.model.lora import LoraConfig
    from mixtral_jax.model.targets import LINEAR_WEIGHTS
    from train.loop import run_model_of

    config = load_config("pretrain_tiny", ["lora.targets=[q_proj,w1]"])
    assert isinstance(config.lora, LoraConfig) and TrainConfig().lora.targets == LINEAR_WEIGHTS
    assert run_model_of(config).lora == {"rank": 16, "alpha": 32.0, "dropout": 0.05, "targets": ["q_proj", "w1"]}
    assert run_model_of(config).modules_to_save == ("embed_tokens", "lm_head")
    full = run_model_of(load_config("pretrain_tiny", ["lora.enabled=false"]))
    assert full.lora is None and full.modules_to_save == ()
    with pytest.raises(ConfigError, match="key 'lora.targets' must be one of q_proj, k_proj"):
        load_config("pretrain_tiny", ["lora.targets=[q_proj,mlp]"])


def test_the_optimizer_section_is_what_the_optimizer_factory_takes():
    from train.optim import OptimizerConfig

    config = load_config("pretrain_tiny", ["optimizer.state_dtype=bfloat16"])
    assert type(config.optimizer) is OptimizerConfig and config.optimizer.state_dtype == "bfloat16"
    assert TrainConfig().optimizer.state_dtype == "float32"
    with pytest.raises(ConfigError, match="key 'optimizer.state_dtype' must be one of float32, bfloat16, param"):
        load_config("pretrain_tiny", ["optimizer.state_dtype=fp8"])
