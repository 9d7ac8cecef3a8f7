"""FLOP accounting, so every step can report MFU against a stated peak.

    active parameters N = L * (D*H*hd + 2*D*KV*hd + H*hd*D  +  D*E  +  k * 3*D*F)  +  D*V
                          (q, k, v, o projections; router; the top-k experts' w1, w3, w2; LM head)
    forward FLOPs / token  = 2 N + 4 * L * S * H * hd       (QK^T and PV over the full S x S square)
    training FLOPs / token = 3 x forward = 6 N + 12 * L * S * H * hd

The embedding lookup is not a matmul and is not counted. LoRA adds 6 * r * (in + out) per adapted weight and
token (k experts' adapters per token), and we count the frozen base's weight gradients although LoRA skips
them, as MFU is conventionally quoted for the whole model (6 N).
"""

from __future__ import annotations

from mixtral_jax.config import MixtralConfig


def flop_counts(config: MixtralConfig, seq: int) -> dict:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim
    e, k, layers = config.num_local_experts, config.num_experts_per_tok, config.num_hidden_layers
    attn_proj = d * h * hd + 2 * d * kv * hd + h * hd * d
    router = d * e
    experts = k * 3 * d * f
    head = d * v
    active = layers * (attn_proj + router + experts) + head
    attn_scores = layers * 4 * seq * h * hd
    forward = 2 * active + attn_scores
    return {
        "active_params": active,
        "forward_flops_per_token": forward,
        "train_flops_per_token": 3 * forward,
        "per_token": {  # forward FLOPs per token, by part (all layers)
            "attention_projections": 2 * layers * attn_proj,
            "attention_scores": attn_scores,
            "router": 2 * layers * router,
            "experts_topk": 2 * layers * experts,
            "lm_head": 2 * head,
        },
    }


def mfu(tokens_per_second: float, config: MixtralConfig, seq: int, peak_flops: float, training: bool = True) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the stated peak FLOP/s."""
    counts = flop_counts(config, seq)
    per_token = counts["train_flops_per_token" if training else "forward_flops_per_token"]
    return tokens_per_second * per_token / peak_flops


# Dense bf16 peak FLOP/s per chip from the vendors' data sheets, by a substring of `device.device_kind`
# (more specific names first: a v5e reports "TPU v5 lite", a v5p "TPU v5").
CHIP_PEAK_FLOPS = (("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
                   ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def chip_peak_flops(device) -> float | None:
    """The data-sheet bf16 peak of a known accelerator, else None (CPUs: measure it)."""
    return next((peak for name, peak in CHIP_PEAK_FLOPS if name in device.device_kind), None)


def measure_matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a jitted n^3 fp32 matmul on the default device (median of `repeats` after two warm-ups)."""
    import statistics
    import time

    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        matmul(x, y).block_until_ready()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)
