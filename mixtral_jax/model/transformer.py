"""The Mixtral causal language model in Flax NNX.

The decoder layers are created stacked (every parameter has a leading `layers` axis) so that they can run
under one `jax.lax.scan`, which keeps compile time flat in depth; `scan_layers=False` unrolls the same
parameters instead. A rematerialisation policy wraps the layer body.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.attention import Attention, visibility
from mixtral_jax.model.lora import LoraConfig
from mixtral_jax.model.moe import EXPERT_PRODUCTS, SparseMoE
from mixtral_jax.parallel.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The experts' grouped products are Pallas calls (or ragged dots, or loops), which no dot policy saves.
    "dots_and_experts": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(EXPERT_PRODUCTS)),
}


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        pdtype = jnp.dtype(config.param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, pdtype)
        self.self_attn = Attention(config, rngs=rngs, lora=lora)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, pdtype)
        self.block_sparse_moe = SparseMoE(config, rngs=rngs, lora=lora)

    def __call__(self, x, positions, mask, cache_kv=None, first_slot=None, dropout_key=None, router_bias=None):
        attention_key, moe_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        attn_out, kv = self.self_attn(self.input_layernorm(x), positions, mask, cache_kv, first_slot,
                                      attention_key)
        x = x + attn_out
        moe_out, router_logits, dropped = self.block_sparse_moe(self.post_attention_layernorm(x), moe_key,
                                                                router_bias)
        return x + moe_out, router_logits, (kv if cache_kv is not None else None), dropped


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, [L, B, S, kv_heads, hd], plus which slots hold real tokens."""

    keys: jax.Array
    values: jax.Array
    valid: jax.Array          # [B, S] bool
    length: jax.Array         # int32 scalar: slots written so far (the same for every row)
    next_position: jax.Array  # [B] int32: RoPE position of each row's next real token

    @classmethod
    def create(cls, config: MixtralConfig, batch: int, max_length: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.resolved_head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_length), bool), length=jnp.int32(0),
                   next_position=jnp.zeros((batch,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


@flax.struct.dataclass
class MixtralOutput:
    logits: jax.Array          # [B, T, V] in the compute dtype
    aux_loss: jax.Array        # scalar fp32: transformers' load_balancing_loss_func over all layers
    router_logits: jax.Array   # [L, B, T, E] fp32
    dropped_tokens: jax.Array  # int32: (token, expert) assignments the capacity backend dropped
    cache: Any = None          # the updated KVCache when one was given
    hidden_states: Any = None  # [B, T, D] after the final norm, instead of logits, with return_hidden=True


class Mixtral(nnx.Module):
    """MixtralForCausalLM. Parameter names follow transformers' module names; with `lora`, the targeted
    weights carry adapters (`{name}_lora_a/_b`, see lora.py)."""

    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        self.config = config
        self.lora = lora
        pdtype = jnp.dtype(config.param_dtype)
        init = jax.nn.initializers.normal(0.02)
        self.embed_tokens = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), pdtype),
                                      logical_axes=("vocab", "embed"))
        self.layers = _stacked_layers(config, rngs, lora)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, pdtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (config.hidden_size, config.vocab_size), pdtype),
                                     logical_axes=("embed", "vocab"))

    def __call__(self, input_ids: Any, attention_mask: Any = None,
                 cache: KVCache | None = None, layers: list[DecoderLayer] | None = None,
                 dropout_key: jax.Array | None = None, return_hidden: bool = False,
                 router_bias: jax.Array | None = None) -> MixtralOutput:
        """input_ids [B, T], or [T]: one sequence, run as a batch of 1 (the outputs keep the batch axis,
        logits [1, T, V]); attention_mask of the same shape: 1 = real token, 0 = padding (left padding for
        generation), or, for packed training rows, segment ids 1, 2, 3, ... (nondecreasing along the row):
        attention stays inside a segment and positions restart at each one.

        Host inputs (nested lists, numpy arrays) are checked here: integer ids in [0, vocab_size), or a
        ValueError naming the range. JAX arrays (and whatever is traced under jit) are not: an id out of range
        then silently reads another row of the embedding (JAX clamps a large index and counts a negative one
        from the end); checking would wait on the device, and cannot raise under jit.

        `layers` (from `split_layers`) runs those modules, unrolled, instead of the stacked parameters.
        `dropout_key` turns on LoRA dropout (training). `return_hidden` skips the LM head and returns the
        final hidden states (for callers that need only some columns or positions of the [B, T, V] logits:
        multiply by `output_head()` themselves).
        `router_bias` [L, E] is added to each layer's router logits before the softmax and top-k (the returned
        `router_logits` are the biased ones): `-inf` at (l, e) switches expert e of layer l off (see SparseMoE).
        """
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        input_ids, attention_mask = token_batch(input_ids, attention_mask, cfg.vocab_size)
        batch, length = input_ids.shape
        segments = (jnp.ones((batch, length), jnp.int32) if attention_mask is None
                    else attention_mask.astype(jnp.int32))
        mask = segments > 0
        if cache is None:
            positions = jnp.where(mask, positions_in_segments(segments), 1)  # transformers' ids for padding
            query_slots = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
            key_segments, cache_kv, first_slot = segments, None, None
        else:
            rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
            positions = jnp.where(mask, cache.next_position[:, None] + rank, 1)
            query_slots = jnp.broadcast_to(cache.length + jnp.arange(length, dtype=jnp.int32), (batch, length))
            key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, cache.length, axis=1)
            key_segments, segments = key_valid.astype(jnp.int32), mask.astype(jnp.int32)
            cache_kv, first_slot = (cache.keys, cache.values), cache.length
        attn_mask = visibility(query_slots, segments, key_segments, cfg.sliding_window)

        x = constrain(self.embed_tokens[...].astype(dtype)[input_ids], ("batch", "length", "act_embed"))
        router_bias = None if router_bias is None else _checked_router_bias(router_bias, cfg)
        x, router_logits, new_kv, dropped = self._run_layers(x, positions, attn_mask, cache_kv, first_slot, layers,
                                                             dropout_key, router_bias)
        x = self.norm(x)
        logits = None if return_hidden else constrain(jnp.einsum("btd,dv->btv", x, self.output_head()),
                                                      ("batch", "length", "act_vocab"))

        new_cache = None
        if cache is not None:
            new_cache = KVCache(keys=new_kv[0], values=new_kv[1], valid=key_segments > 0, length=cache.length + length,
                                next_position=cache.next_position + jnp.sum(mask, axis=-1, dtype=jnp.int32))
        aux = load_balancing_loss(router_logits, cfg.num_experts_per_tok, mask)
        return MixtralOutput(logits=logits, aux_loss=aux, router_logits=router_logits,
                             dropped_tokens=jnp.sum(dropped), cache=new_cache,
                             hidden_states=x if return_hidden else None)

    def output_head(self) -> jax.Array:
        """[D, V] in the compute dtype: the LM head, or the transposed embedding when they are tied."""
        head = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return head.astype(jnp.dtype(self.config.dtype))

    def split_layers(self) -> list[DecoderLayer]:
        """One module per layer with its own parameter buffers.

        Decoding loops run these: slicing the stacked parameters inside a loop copies every layer's weights
        (all experts included) on every step, which on CPU costs more than the step's arithmetic.
        """
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(self.config.num_hidden_layers)]

    def _run_layers(self, x, positions, mask, cache_kv, first_slot, layers=None, dropout_key=None, router_bias=None):
        graphdef, state = nnx.split(self.layers)
        layer_keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_hidden_layers)

        def body(hidden, layer_inputs):
            layer, kv, key, bias = layer_inputs
            if not isinstance(layer, DecoderLayer):
                layer = nnx.merge(graphdef, layer)
            hidden, router_logits, kv, dropped = layer(hidden, positions, mask, kv, first_slot, key, bias)
            return hidden, (router_logits, kv, dropped)

        if self.config.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat_policy])
        if self.config.scan_layers and layers is None:
            x, (router_logits, kv, dropped) = jax.lax.scan(body, x, (state, cache_kv, layer_keys, router_bias))
            return x, router_logits, kv, dropped
        outputs = []
        for i in range(self.config.num_hidden_layers):
            layer = layers[i] if layers is not None else jax.tree.map(lambda a: a[i], state)
            x, out = body(x, (layer, *jax.tree.map(lambda a: a[i], (cache_kv, layer_keys, router_bias))))
            outputs.append(out)
        router_logits, kv, dropped = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
        return x, router_logits, kv, dropped


def token_batch(input_ids: Any, attention_mask: Any = None, vocab_size: int | None = None,
                what: str = "input_ids") -> tuple[jax.Array, jax.Array | None]:
    """(ids [B, T], mask [B, T] or None) from the caller's: a [T] sequence becomes a batch of 1; host
    values (lists, numpy) become arrays, their ids checked to be integers in [0, vocab_size). JAX arrays keep
    their values unchecked (no wait on the device, nothing to check under jit); only their shapes are."""
    if isinstance(input_ids, jax.Array):
        ids = input_ids
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{what} must be integer token ids, got a {ids.dtype} array")
    else:
        ids = jnp.asarray(_host_token_ids(input_ids, vocab_size, what))
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise ValueError(f"{what} must be [batch, length] or [length], got shape {tuple(ids.shape)}")
    if attention_mask is None:
        return ids, None
    mask = attention_mask if isinstance(attention_mask, jax.Array) else jnp.asarray(_host_mask(attention_mask))
    if mask.ndim == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from {what} shape {tuple(ids.shape)}")
    return ids, mask


def _host_token_ids(value: Any, vocab_size: int | None, what: str) -> np.ndarray:
    """int32 ids from a nested list or numpy array, refused when not integers in [0, vocab_size)."""
    try:
        ids = np.asarray(value)
    except ValueError:  # ragged rows
        raise ValueError(f"{what}: rows of different lengths; pad them to one length (left padding for "
                         f"generation) and pass attention_mask") from None
    if ids.size == 0:
        return ids.astype(np.int32)
    if ids.dtype.kind in "USO":
        raise ValueError(f"{what} must be integer token ids, not text or objects ({value!r:.60}); tokenize "
                         f"text first (tokenizer.encode)")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integer token ids, got {ids.dtype}")
    low, high = int(ids.min()), int(ids.max())
    if vocab_size is not None and (low < 0 or high >= vocab_size):
        bad = low if low < 0 else high
        raise ValueError(f"{what}: token id {bad} is out of range [0, {vocab_size}) (vocab_size {vocab_size})")
    return ids.astype(np.int32)


def _host_mask(value: Any) -> np.ndarray:
    try:
        mask = np.asarray(value)
    except ValueError:
        raise ValueError("attention_mask: rows of different lengths") from None
    if mask.size and mask.dtype.kind not in "biu":
        raise ValueError(f"attention_mask must hold 1/0 (or True/False, or segment ids), got {mask.dtype}")
    return mask if mask.dtype == bool else mask.astype(np.int32)


def _stacked_layers(config: MixtralConfig, rngs: nnx.Rngs, lora: LoraConfig | None) -> DecoderLayer:
    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(layer_rngs):
        return DecoderLayer(config, rngs=layer_rngs, lora=lora)

    layers = create(rngs)
    for _, variable in nnx.iter_graph(layers):
        if isinstance(variable, nnx.Variable):
            variable.set_metadata("logical_axes", ("layers", *variable.get_metadata()["logical_axes"]))
    return layers


def _checked_router_bias(router_bias, config: MixtralConfig) -> jax.Array:
    router_bias = jnp.asarray(router_bias, jnp.float32)
    expected = (config.num_hidden_layers, config.num_local_experts)
    if router_bias.shape != expected:
        raise ValueError(f"router_bias shape {router_bias.shape}: expected [layers, experts] = {expected}")
    return router_bias


def positions_in_segments(segments: jax.Array) -> jax.Array:
    """RoPE position of each token: how many real tokens of its segment come before it. With 0/1 masks this
    is the count of earlier real tokens (transformers' cumsum - 1); segment ids must not decrease."""
    real = segments > 0
    rank = jnp.cumsum(real, axis=-1, dtype=jnp.int32) - 1
    previous_max = jnp.pad(jax.lax.cummax(segments, axis=1), ((0, 0), (1, 0)))[:, :-1]
    starts = real & (segments > previous_max)
    return rank - jax.lax.cummax(jnp.where(starts, rank, 0), axis=1)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """transformers' `load_balancing_loss_func`: E * sum_e(share of assignments to e * mean router prob of e).

    router_logits [L, B, T, E]; padding tokens (mask 0) are left out. A uniform router gives top_k.
    """
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(selected, num_experts, dtype=jnp.float32), axis=-2)
    weight = jnp.ones(router_logits.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
    rows = router_logits.shape[0] * jnp.sum(weight)
    tokens_per_expert = jnp.einsum("lbte,bt->e", counts, weight) / rows
    prob_per_expert = jnp.einsum("lbte,bt->e", probs, weight) / rows
    return num_experts * jnp.sum(tokens_per_expert * prob_per_expert)
