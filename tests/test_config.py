"""MixtralConfig: reading HF config.json (both RoPE spellings), presets, overrides and clear errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import ConfigError

# A transformers-4 / Hub style config.json (top-level rope_theta).
HUB_STYLE = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "sliding_window": None,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
}

ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "rope_theta", "rms_norm_eps",
    "sliding_window", "max_position_embeddings", "tie_word_embeddings", "router_aux_loss_coef", "bos_token_id",
    "eos_token_id",
)


def transformers5_style(**changes):
    """The same config as transformers 5 writes it: rope_parameters, head_dim null, dtype instead of torch_dtype."""
    raw = {k: v for k, v in HUB_STYLE.items() if k not in ("rope_theta", "torch_dtype")}
    raw.update(rope_parameters={"rope_theta": HUB_STYLE["rope_theta"], "rope_type": "default"}, head_dim=None,
               dtype="float32", transformers_version="5.24.0", output_router_logits=False,
               router_jitter_noise=0.0, pad_token_id=None, use_cache=True, attention_dropout=0.0,
               initializer_range=0.02)
    raw.update(changes)
    return raw


def arch(config: MixtralConfig) -> dict:
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS} | {"head_dim": config.resolved_head_dim}


# ------------------------------------------------------------------------------------------------ reading
def test_from_hf_dict():
    config = MixtralConfig.from_hf(HUB_STYLE)
    assert config.vocab_size == 128 and config.hidden_size == 32 and config.intermediate_size == 64
    assert config.num_hidden_layers == 2 and config.num_attention_heads == 4 and config.num_key_value_heads == 2
    assert config.num_local_experts == 4 and config.num_experts_per_tok == 2
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 512 and config.router_aux_loss_coef == 0.02
    assert config.sliding_window is None and config.tie_word_embeddings is False
    assert config.resolved_head_dim == 8


def test_from_hf_file_and_directory(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HUB_STYLE))
    from_dict = MixtralConfig.from_hf(HUB_STYLE)
    assert MixtralConfig.from_hf(path) == from_dict
    assert MixtralConfig.from_hf(str(path)) == from_dict
    assert MixtralConfig.from_hf(tmp_path) == from_dict  # the directory holding config.json


def test_from_hf_implementation_kwargs():
    config = MixtralConfig.from_hf(HUB_STYLE, moe_backend="capacity", dtype="bfloat16")
    assert config.moe_backend == "capacity" and config.dtype == "bfloat16"
    assert arch(config) == arch(MixtralConfig.from_hf(HUB_STYLE))


def test_both_rope_spellings_give_the_same_config():
    hub = MixtralConfig.from_hf(HUB_STYLE)
    t5 = MixtralConfig.from_hf(transformers5_style())
    assert hub == t5
    assert t5.rope_theta == 10000.0
    # Both spellings present and agreeing is fine too.
    both = MixtralConfig.from_hf(transformers5_style(rope_theta=10000.0))
    assert both == hub


def test_head_dim_null_resolves_to_hidden_over_heads():
    config = MixtralConfig.from_hf(transformers5_style(head_dim=None))
    assert config.resolved_head_dim == 32 // 4
    explicit = MixtralConfig.from_hf(transformers5_style(head_dim=16))
    assert explicit.resolved_head_dim == 16


def test_round_trip_to_hf():
    for config in (MixtralConfig.from_hf(HUB_STYLE), MixtralConfig.from_hf(transformers5_style(head_dim=16)),
                   MixtralConfig.from_hf(HUB_STYLE | {"sliding_window": 7, "tie_word_embeddings": True}),
                   MixtralConfig.from_preset("mixtral-8x7b")):
        again = MixtralConfig.from_hf(config.to_hf())
        assert arch(again) == arch(config)
        # The written dict is plain JSON in the Hub's spelling.
        hf = json.loads(json.dumps(config.to_hf()))
        assert hf["rope_theta"] == config.rope_theta and "rope_parameters" not in hf
        assert hf["model_type"] == "mixtral" and hf["architectures"] == ["MixtralForCausalLM"]


def test_to_hf_is_read_by_transformers():
    from transformers import MixtralConfig as HFMixtralConfig

    config = MixtralConfig.from_hf(HUB_STYLE | {"sliding_window": 7})
    hf = HFMixtralConfig(**config.to_hf())
    assert hf.hidden_size == 32 and hf.num_local_experts == 4 and hf.sliding_window == 7
    rope = getattr(hf, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(hf, "rope_theta", None)) == 10000.0


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", ["tiny", "mixtral-8x7b", "bench-tiny", "bench-moe"])
def test_presets_load(name):
    config = MixtralConfig.from_preset(name)
    assert isinstance(config, MixtralConfig)
    assert config.vocab_size == 32000
    assert config.num_local_experts == 8 and config.num_experts_per_tok == 2


def test_mixtral_8x7b_preset_has_the_hub_shape():
    c = MixtralConfig.from_preset("mixtral-8x7b")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (32000, 4096, 14336)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (32, 32, 8)
    assert c.resolved_head_dim == 128
    assert (c.num_local_experts, c.num_experts_per_tok) == (8, 2)
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-5
    assert c.router_aux_loss_coef == 0.02
    assert c.sliding_window is None and c.max_position_embeddings == 32768 and not c.tie_word_embeddings


def test_bench_presets_shapes():
    tiny = MixtralConfig.from_preset("bench-tiny")
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_hidden_layers) == (256, 512, 4)
    assert (tiny.num_attention_heads, tiny.num_key_value_heads) == (8, 4)
    moe = MixtralConfig.from_preset("bench-moe")
    assert (moe.hidden_size, moe.intermediate_size, moe.num_hidden_layers) == (512, 1024, 8)


def test_preset_overrides_and_unknown_preset():
    config = MixtralConfig.from_preset("tiny", {"num_hidden_layers": 1})
    assert config.num_hidden_layers == 1
    with pytest.raises(ConfigError, match="no-such-preset"):
        MixtralConfig.from_preset("no-such-preset")


def test_with_overrides():
    base = MixtralConfig.from_preset("tiny")
    config = base.with_overrides(["moe_backend=capacity", "capacity_factor=1.5"])
    assert config.moe_backend == "capacity"
    assert config.capacity_factor == 1.5 and isinstance(config.capacity_factor, float)
    assert arch(config) == arch(base)
    assert base == MixtralConfig.from_preset("tiny")  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.hidden_size = 8  # type: ignore[misc]


def test_with_overrides_errors():
    base = MixtralConfig.from_preset("tiny")
    with pytest.raises(ConfigError, match="moe_backend"):
        base.with_overrides(["moe_backend=sparse"])
    with pytest.raises(ConfigError,
                       match="'attention_implementation' must be one of auto, xla, cudnn, splash, got 'flash'"):
        base.with_overrides(["attention_implementation=flash"])
    assert base.with_overrides(["grouped_matmul=mosaic_gpu"]).grouped_matmul == "mosaic_gpu"
    with pytest.raises(ConfigError, match="no_such_field"):
        base.with_overrides(["no_such_field=1"])
    with pytest.raises(ConfigError, match="key=value"):
        base.with_overrides(["moe_backend"])
    with pytest.raises(ConfigError, match=r"override 'x=\[a, b=\[c\], d\]': the value is not valid YAML"):
        base.with_overrides(["x=[a, b=[c], d]"])


# ------------------------------------------------------------------------------------------------ errors
def test_missing_required_field():
    raw = {k: v for k, v in HUB_STYLE.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="'hidden_size'.*missing"):
        MixtralConfig.from_hf(raw)


def test_unknown_field():
    with pytest.raises(ConfigError, match="hiden_size"):
        MixtralConfig.from_hf(HUB_STYLE | {"hiden_size": 32})


def test_contradictory_rope_theta():
    raw = transformers5_style(rope_theta=1e6)  # rope_parameters says 1e4
    with pytest.raises(ConfigError, match="rope_theta") as err:
        MixtralConfig.from_hf(raw)
    assert "rope_parameters" in str(err.value)


def test_unsupported_rope_type():
    raw = transformers5_style(rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="rope_type"):
        MixtralConfig.from_hf(raw)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        MixtralConfig.from_hf(HUB_STYLE | {"num_key_value_heads": 3})


def test_top_k_exceeds_experts():
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        MixtralConfig.from_hf(HUB_STYLE | {"num_experts_per_tok": 5})


def test_bad_moe_backend():
    with pytest.raises(ConfigError, match="moe_backend"):
        MixtralConfig.from_hf(HUB_STYLE, moe_backend="sparse")
    with pytest.raises(ConfigError, match="moe_backend"):
        MixtralConfig(moe_backend="sparse")


def test_hidden_act_must_be_silu():
    with pytest.raises(ConfigError, match="hidden_act"):
        MixtralConfig.from_hf(HUB_STYLE | {"hidden_act": "gelu"})


def test_model_type_must_be_mixtral():
    with pytest.raises(ConfigError, match="model_type"):
        MixtralConfig.from_hf(HUB_STYLE | {"model_type": "llama"})


def test_non_json_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{ not json at all")
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_hf(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_hf(tmp_path)  # through the directory
    assert str(path) in str(err.value)


def test_json_not_an_object_and_missing_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="config.json"):
        MixtralConfig.from_hf(path)
    missing = tmp_path / "nothing" / "config.json"
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_hf(missing)
    assert str(missing) in str(err.value)


def test_file_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in HUB_STYLE.items() if k != "num_local_experts"}))
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_hf(path)
    assert str(path) in str(err.value) and "num_local_experts" in str(err.value)
    path.write_text(json.dumps(HUB_STYLE | {"num_key_value_heads": 3}))
    with pytest.raises(ConfigError) as err:
        MixtralConfig.from_hf(path)
    assert str(path) in str(err.value) and "num_key_value_heads" in str(err.value)


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("vocab_size", -1), ("num_hidden_layers", 2.5),
                                          ("rms_norm_eps", 0.0), ("sliding_window", 0), ("head_dim", 7)])
def test_invalid_values(field, value):
    with pytest.raises(ConfigError, match=field):
        MixtralConfig.from_hf(HUB_STYLE | {field: value})


def test_head_dim_null_needs_divisible_hidden():
    with pytest.raises(ConfigError, match="head_dim"):
        MixtralConfig.from_hf(HUB_STYLE | {"hidden_size": 30, "head_dim": None})


def test_overrides_accept_exponent_floats():
    config = MixtralConfig.from_preset("tiny").with_overrides(["rope_theta=1e6", "rms_norm_eps=1e-5"])
    assert config.rope_theta == 1e6 and config.rms_norm_eps == 1e-5


def test_tie_word_embeddings_must_be_bool():
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        MixtralConfig.from_hf(HUB_STYLE | {"tie_word_embeddings": "yes"})


# ------------------------------------------------------------------------------------------------ dtypes
def _dtype_spellings():
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    return [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("BF16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
            ("float32", "float32"), ("fp32", "float32"), ("f32", "float32"), ("float", "float32"),
            ("float16", "float16"), ("fp16", "float16"), ("half", "float16"),
            (jnp.bfloat16, "bfloat16"), (jnp.float32, "float32"), (jnp.dtype("float16"), "float16"),
            (np.float32, "float32"), (np.dtype(np.float16), "float16"), (ml_dtypes.bfloat16, "bfloat16"),
            (np.dtype(ml_dtypes.bfloat16), "bfloat16")]


def test_canonical_dtype_takes_names_short_forms_and_dtype_objects():
    from mixtral_jax.config import canonical_dtype

    for value, expected in _dtype_spellings():
        assert canonical_dtype(value) == expected, value


@pytest.mark.parametrize("value", ["float64", "int8", "bfloat", "", None, 3, float])
def test_canonical_dtype_refuses_others_naming_the_argument(value):
    from mixtral_jax.config import canonical_dtype

    with pytest.raises(ConfigError, match=r"^from_pretrained: argument 'dtype': expected one of float32, "
                                          r"bfloat16, float16 \(or bf16, .*got "):
        canonical_dtype(value, "from_pretrained: argument 'dtype'")


def test_config_dtype_fields_take_any_spelling_and_keep_the_canonical_name():
    import jax.numpy as jnp
    import numpy as np

    config = MixtralConfig.from_hf(HUB_STYLE, dtype=jnp.bfloat16, param_dtype=np.float32)
    assert (config.dtype, config.param_dtype) == ("bfloat16", "float32")
    assert config == MixtralConfig.from_hf(HUB_STYLE, dtype="bf16", param_dtype="fp32")
    assert MixtralConfig(dtype="half").dtype == "float16"
    assert config.replace(param_dtype=jnp.float16).to_hf()["torch_dtype"] == "float16"
    with pytest.raises(ConfigError, match=r"field 'param_dtype' must be one of float32, bfloat16, float16"):
        MixtralConfig(param_dtype="float64")
