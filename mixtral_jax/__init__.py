"""mixtral-jax: a JAX/Flax port of the Chinese-Mixtral language adaptation (QLoRA on a sparse-MoE Mixtral)."""

from mixtral_jax.config import ConfigError, MixtralConfig
from mixtral_jax.hf_checkpoint import from_pretrained, save_pretrained
from mixtral_jax.model import KVCache, Mixtral, MixtralOutput, load_balancing_loss
from mixtral_jax.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Mixtral", "MixtralConfig", "MixtralOutput",
           "from_pretrained", "load_balancing_loss", "save_pretrained"]
