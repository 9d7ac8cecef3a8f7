"""Model configuration: one frozen dataclass, read from HF `config.json`, YAML presets and `key=value` overrides.

The architecture fields mirror transformers' `MixtralConfig` (only those that change the computation); the
implementation fields (MoE backend, dtypes, scanning, remat) are ours and never written to `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any, Mapping

import yaml

from mixtral_jax.errors import ConfigError

MOE_BACKENDS = ("dense", "dropless", "capacity")
EXPERT_EXCHANGES = ("auto", "ragged", "padded")
GROUPED_MATMULS = ("auto", "ragged_dot", "mosaic_gpu", "megablox", "blocked", "tokamax")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_and_experts")
DTYPES = ("float32", "bfloat16", "float16")
# Other spellings of DTYPES (lower case): the short forms and torch's names ("float" and "half" as torch means them).
DTYPE_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16",
                 "f16": "float16", "half": "float16"}

# Keys of an HF config.json that do not change the forward computation (or only its training-time noise,
# which we do not model). Anything outside these and our own fields is refused, so a typo cannot pass.
_HF_INERT_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "output_router_logits", "router_jitter_noise", "attention_dropout", "pad_token_id",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "_attn_implementation",
    "_attn_implementation_autoset", "auto_map", "quantization_config", "bos_token_id", "eos_token_id",
    "rope_parameters", "rope_theta", "rope_scaling", "hidden_act", "head_dim", "tie_word_embeddings",
    "sliding_window", "max_window_layers", "use_sliding_window", "num_experts", "task_specific_params",
    "finetuning_task", "prefix", "decoder_start_token_id", "sep_token_id", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "bad_words_ids", "begin_suppress_tokens", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "suppress_tokens",
    "temperature", "top_k", "top_p", "typical_p", "is_decoder",
})
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    # Architecture (transformers' MixtralConfig names).
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Implementation (ours).
    moe_backend: str = "dropless"
    # The dropless experts' product: "mosaic_gpu" (Hopper GPUs), "ragged_dot" (TPU), "blocked" (CPU); "auto"
    # picks by the default device (kernels/select.py). "tokamax": tokamax's ragged_dot (extra `gpu`), on trial.
    grouped_matmul: str = "auto"
    moe_block_size: int = 128  # rows per block of the "blocked" grouped product
    # How dropless rows reach experts split over the mesh: "ragged" (only the real rows; TPU, GPU), "padded"
    # (fixed buffers; CPU); "auto" picks by the default device (kernels/select.py).
    expert_exchange: str = "auto"
    capacity_factor: float = 2.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    # Per layer under "full": nothing saved; "dots" / "dots_no_batch": matmul outputs (without batch dims);
    # "dots_and_experts": dots_no_batch plus the experts' products (a Pallas call is no dot), see transformer.py.
    remat_policy: str = "none"
    attention_chunk: int | None = None  # attend in blocks of this many queries when longer (bounded memory)
    attention_implementation: str = "auto"  # "cudnn" (NVIDIA, bf16/fp16), "splash" (TPU), "xla"; "auto" picks

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # jnp.bfloat16, np.float32, "bf16", ...: the canonical name
            try:
                object.__setattr__(self, name, canonical_dtype(getattr(self, name)))
            except ConfigError:
                pass  # validate() reports it, naming the field and the source
        self.validate()
        if self.head_dim is None:  # resolved once, so a config equals itself after an HF round trip
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # ---------------------------------------------------------------- derived values
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def validate(self, source: str = "config") -> None:
        def fail(field, why):
            raise ConfigError(f"{source}: field '{field}' {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
                     "moe_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"({self.num_key_value_heads}) must divide num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("head_dim", f"is null but hidden_size ({self.hidden_size}) is not divisible by "
                 f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0
                                          or self.head_dim % 2):
            fail("head_dim", f"must be a positive even integer, got {self.head_dim!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            fail("num_experts_per_tok", f"({self.num_experts_per_tok}) exceeds num_local_experts "
                 f"({self.num_local_experts})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            fail("sliding_window", f"must be null or a positive integer, got {self.sliding_window!r}")
        if self.attention_chunk is not None and (not isinstance(self.attention_chunk, int)
                                                 or isinstance(self.attention_chunk, bool)
                                                 or self.attention_chunk <= 0):
            fail("attention_chunk", f"must be null or a positive integer, got {self.attention_chunk!r}")
        for name, value in (("rope_theta", self.rope_theta), ("rms_norm_eps", self.rms_norm_eps),
                            ("capacity_factor", self.capacity_factor)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive number, got {value!r}")
        for name in ("tie_word_embeddings", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be true or false, got {getattr(self, name)!r}")
        for name, value, allowed in (("moe_backend", self.moe_backend, MOE_BACKENDS),
                                     ("grouped_matmul", self.grouped_matmul, GROUPED_MATMULS),
                                     ("attention_implementation", self.attention_implementation,
                                      ATTENTION_IMPLEMENTATIONS),
                                     ("expert_exchange", self.expert_exchange, EXPERT_EXCHANGES),
                                     ("remat_policy", self.remat_policy, REMAT_POLICIES),
                                     ("dtype", self.dtype, DTYPES), ("param_dtype", self.param_dtype, DTYPES)):
            if value not in allowed:
                fail(name, f"must be one of {', '.join(allowed)}, got {value!r}")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "MixtralConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{source}: unknown field '{unknown[0]}' (known: {', '.join(cls.field_names())})")
        try:
            config = cls(**values)
        except ConfigError as err:
            raise ConfigError(str(err).replace("config:", f"{source}:", 1)) from None
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from None
        return config

    @classmethod
    def from_preset(cls, name: str, overrides: Mapping[str, Any] | None = None) -> "MixtralConfig":
        """A named preset from `mixtral_jax/presets/NAME.yaml`, with field overrides applied."""
        preset = resources.files("mixtral_jax") / "presets" / f"{name}.yaml"
        if not preset.is_file():
            raise ConfigError(f"unknown preset '{name}' (available: {', '.join(list_presets())})")
        values = yaml.safe_load(preset.read_text()) or {}
        values.update(overrides or {})
        return cls.from_dict(values, source=f"preset {name}")

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **implementation) -> "MixtralConfig":
        """Reads an HF `config.json` (a file, its directory, or the parsed dict).

        Both spellings of RoPE are accepted: the Hub's top-level `rope_theta` and transformers 5's
        `rope_parameters`. Implementation fields (backend, dtypes, ...) are passed as keyword arguments.
        """
        if isinstance(path_or_dict, Mapping):
            source, raw = "config.json", dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            raw = read_json_object(path)

        def fail(field, why):
            raise ConfigError(f"{source}: field '{field}' {why}")

        if raw.get("model_type", "mixtral") != "mixtral":
            fail("model_type", f"is {raw['model_type']!r}, expected 'mixtral'")
        if raw.get("hidden_act", "silu") != "silu":
            fail("hidden_act", f"is {raw['hidden_act']!r}; only 'silu' is supported")
        for name in _HF_REQUIRED:
            if name not in raw:
                fail(name, "is missing")
        unknown = sorted(set(raw) - _HF_INERT_KEYS - set(cls.field_names()))
        if unknown:
            fail(unknown[0], "is not a Mixtral config field")

        rope_theta = raw.get("rope_theta")
        rope_parameters = raw.get("rope_parameters") or {}
        if not isinstance(rope_parameters, Mapping):
            fail("rope_parameters", "must be an object")
        if rope_parameters.get("rope_type", "default") != "default":
            fail("rope_parameters.rope_type", f"is {rope_parameters['rope_type']!r}; only 'default' is supported")
        if raw.get("rope_scaling"):
            fail("rope_scaling", "is set; only unscaled RoPE is supported")
        if "rope_theta" in rope_parameters:
            if rope_theta is not None and rope_theta != rope_parameters["rope_theta"]:
                fail("rope_theta", f"({rope_theta}) contradicts rope_parameters.rope_theta "
                     f"({rope_parameters['rope_theta']})")
            rope_theta = rope_parameters["rope_theta"]
        if raw.get("use_sliding_window") is False:
            raw = {**raw, "sliding_window": None}

        values = {name: raw[name] for name in cls.field_names() if name in raw and name != "rope_theta"}
        if rope_theta is not None:
            values["rope_theta"] = float(rope_theta)
        for name in ("bos_token_id", "eos_token_id"):  # HF allows a list of ids; the first is the canonical one
            if isinstance(values.get(name), list):
                values[name] = values[name][0]
            if values.get(name, 0) is None:
                values.pop(name)
        values.update(implementation)
        return cls.from_dict(values, source=source)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict in the Hub's spelling (top-level `rope_theta`), which transformers 4 and 5 read."""
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.param_dtype,
        }

    def replace(self, **changes) -> "MixtralConfig":
        return self.from_dict({**dataclasses.asdict(self), **changes})

    def with_overrides(self, assignments: list[str]) -> "MixtralConfig":
        """Applies `key=value` strings (values parsed as YAML scalars) and validates the result."""
        return self.replace(**parse_overrides(assignments))


def canonical_dtype(value: Any, what: str = "dtype") -> str:
    """"float32", "bfloat16" or "float16" for any spelling of one: a name in DTYPES, a short form ("bf16",
    "fp32", "f32", "fp16", "half", "float"; any case, "torch." prefix allowed), or a dtype object or scalar type
    (jnp.bfloat16, np.float32, np.dtype("float16"), ml_dtypes.bfloat16, torch.bfloat16). `what` names the
    argument in the ConfigError for anything else ("from_pretrained: argument 'dtype'")."""
    name = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else _dtype_name(value)
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"{what}: expected one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)}, or a "
                          f"dtype such as jnp.bfloat16), got {value!r}")
    return name


def _dtype_name(value: Any) -> str | None:
    """numpy's name of a dtype object or scalar type (jnp's and ml_dtypes' included), or torch's; else None."""
    if value is None or isinstance(value, (bool, int, float)):
        return None
    import numpy as np

    try:
        return np.dtype(value).name
    except (TypeError, ValueError):
        text = str(value)  # torch.bfloat16 -> "bfloat16"
        return text[len("torch."):] if text.startswith("torch.") else None


def read_json_object(path: str, error: type[ValueError] = ConfigError) -> dict:
    """A JSON file (local or gs://) holding one object, or `error` naming the file."""
    from mixtral_jax.io import paths

    try:
        with paths.open_binary(path) as f:
            value = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object")
    return value


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    values = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{assignment}' is not of the form key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = " ".join(str(getattr(err, "problem", "") or err).split())
            raise ConfigError(f"override '{assignment}': the value is not valid YAML ({problem}); quote an item "
                              f"that holds brackets or commas, e.g. key=[a, \"b=[c]\"]") from None
        if isinstance(value, str):  # YAML 1.1 reads "1e6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        values[key.strip()] = value
    return values


# presets/ also holds the logical-axis rules (parallel/sharding.py), which are no model.
NOT_MODEL_PRESETS = ("sharding_rules",)


def list_presets() -> list[str]:
    """The model presets shipped in presets/ (tiny, mixtral-8x7b, the bench shapes)."""
    folder = resources.files("mixtral_jax") / "presets"
    names = (p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(name for name in names if name not in NOT_MODEL_PRESETS)
