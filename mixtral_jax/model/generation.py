"""Autoregressive decoding with the KV cache: one jitted prefill, then one jitted loop of single-token steps.

Sampling follows transformers' `generate` order: repetition penalty, then temperature, top-k and top-p, then
a draw from the softmax (or the argmax when `temperature == 0`). Rows that produced EOS are padded with EOS.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.model.transformer import KVCache, Mixtral, token_batch


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0       # 0: greedy
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1: off
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        checks = [("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature >= 0),
                  ("top_k", self.top_k >= 0), ("top_p", 0 < self.top_p <= 1),
                  ("repetition_penalty", self.repetition_penalty > 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"sampling: field '{name}' has an invalid value {getattr(self, name)!r}")


def process_logits(logits: jax.Array, seen: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B, V] fp32, seen [B, V] bool (tokens already in the sequence) -> processed logits."""
    if sampling.repetition_penalty != 1.0:
        penalised = jnp.where(logits < 0, logits * sampling.repetition_penalty, logits / sampling.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    if sampling.temperature == 0:
        return logits
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < sampling.top_p  # the most likely token is always kept
        threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _choose(logits, seen, key, sampling):
    logits = process_logits(logits.astype(jnp.float32), seen, sampling)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "sampling", "eos_token_id"))
def _generate(graphdef, state, input_ids, attention_mask, sampling: SamplingConfig, eos_token_id: int):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    vocab = model.config.vocab_size
    total = prompt_len + sampling.max_new_tokens
    cache = KVCache.create(model.config, batch, total)
    layers = model.split_layers()
    out = model(input_ids, attention_mask, cache=cache, layers=layers)
    seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], input_ids].set(attention_mask.astype(bool))
    key = jax.random.key(sampling.seed)
    key, step_key = jax.random.split(key)
    token = _choose(out.logits[:, -1], seen, step_key, sampling)
    tokens = jnp.full((batch, sampling.max_new_tokens), eos_token_id, jnp.int32).at[:, 0].set(token)
    done = token == eos_token_id

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < sampling.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, seen, done, key = carry
        previous = tokens[:, step - 1]
        seen = seen.at[jnp.arange(batch), previous].set(True)
        out = model(previous[:, None], jnp.ones((batch, 1), bool), cache=cache, layers=layers)
        key, step_key = jax.random.split(key)
        token = _choose(out.logits[:, -1], seen, step_key, sampling)
        token = jnp.where(done, eos_token_id, token)
        tokens = tokens.at[:, step].set(token)
        return step + 1, out.cache, tokens, seen, done | (token == eos_token_id), key

    *_, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out.cache, tokens, seen, done, key))
    return tokens


def generate(model: Mixtral, input_ids, attention_mask=None, sampling: SamplingConfig = SamplingConfig(),
             eos_token_id: int | None = None) -> np.ndarray:
    """input_ids [B, T] (left-padded when rows differ in length), or [T]: one prompt, a batch of 1 -> new
    tokens [B, max_new_tokens] (a [T] prompt gives [1, max_new_tokens]).

    Token ids, not text (tokenize first), each prompt at least one token; host ids (lists, numpy) must lie in
    [0, vocab_size) (see `Mixtral.__call__`). After a row's EOS the rest of that row is EOS.
    `eos_token_id=-1` never stops early.
    """
    input_ids, attention_mask = token_batch(input_ids, attention_mask, model.config.vocab_size)
    if input_ids.shape[1] == 0:
        raise ValueError(f"generate: an empty prompt (input_ids shape {tuple(input_ids.shape)}); each prompt needs "
                         f"at least one token (e.g. BOS, id {model.config.bos_token_id})")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    graphdef, state = nnx.split(model)
    return np.asarray(_generate(graphdef, state, input_ids.astype(jnp.int32), jnp.asarray(attention_mask, bool),
                                sampling, eos))
