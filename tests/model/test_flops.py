"""FLOP accounting against the figures of the benchmark configs and a hand count for Mixtral-8x7B."""

from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.flops import flop_counts, mfu


def test_benchmark_configs_match_the_design_figures():
    tiny = flop_counts(MixtralConfig.from_preset("bench-tiny"), 256)
    moe = flop_counts(MixtralConfig.from_preset("bench-moe"), 256)
    assert tiny["active_params"] == 12_132_352 and round(tiny["forward_flops_per_token"] / 1e6, 2) == 25.31
    assert moe["active_params"] == 47_874_048 and round(moe["forward_flops_per_token"] / 1e6, 2) == 99.94
    assert tiny["train_flops_per_token"] == 3 * tiny["forward_flops_per_token"]


def test_mixtral_8x7b_has_12_9b_active_parameters():
    config = MixtralConfig.from_preset("mixtral-8x7b")
    counts = flop_counts(config, 4096)
    embedding = config.vocab_size * config.hidden_size  # a lookup, not counted in FLOPs
    assert round((counts["active_params"] + embedding) / 1e9, 1) == 12.9  # Mistral's stated 12.9B active
    assert abs(mfu(1000.0, MixtralConfig.from_preset("mixtral-8x7b"), 4096, 1e15)
               - 1000 * counts["train_flops_per_token"] / 1e15) < 1e-12
