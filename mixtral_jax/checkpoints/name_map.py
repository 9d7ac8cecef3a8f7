"""Our parameters' names and shapes, and which Hugging Face tensor fills which slice of them, from a config
alone: numpy only, no JAX or Flax, so the converters start in a tenth of a second rather than a second
(importing JAX is ~1 s of a 4 s conversion at Mixtral-8x7B's widths).
tests/checkpoints/test_name_map.py checks the shapes
against the Flax model's.

Our layout: linear weights are [in, ...out] (q_proj [D, H, hd]); each decoder parameter is stacked over
layers (`layers.self_attn.q_proj` [L, D, H, hd]) and the experts over experts (`layers.block_sparse_moe.w1`
[L, E, D, F]). HF's: `model.layers.7.self_attn.q_proj.weight` [H * hd, D], one tensor per layer and, in the
legacy layout, per expert; transformers 5's fused layout stacks the experts (`mlp.experts.gate_up_proj`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.io.buffers import transpose_into

# A layer-tensor: one of our parameters for one layer (layer None: embed_tokens, norm.weight, lm_head).
Item = tuple[str, "int | None"]


@dataclasses.dataclass(frozen=True)
class TensorMapping:
    """One HF tensor and the slice of one of our parameters it fills.

    `kind` says how the two relate: "copy" (same layout), "linear" (HF [out, in] against our [in, ...out]:
    transpose and reshape), or "fused_w1" / "fused_w3" / "fused_w2" (transformers 5's stacked experts).
    """

    hf_key: str
    param: str            # our parameter path, dotted
    index: tuple          # index into our (stacked) parameter
    hf_shape: tuple
    kind: str


def layer_shapes(config: MixtralConfig) -> dict[str, tuple[tuple, str]]:
    """Our parameter name -> (shape of one layer-tensor, i.e. without the layers axis; dtype), as the model
    (model/transformer.py, attention.py, moe.py) creates them."""
    d, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_local_experts
    hd, h, kv = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    shapes = {"embed_tokens": (v, d),
              "layers.input_layernorm.weight": (d,),
              "layers.post_attention_layernorm.weight": (d,),
              "layers.self_attn.q_proj": (d, h, hd),
              "layers.self_attn.k_proj": (d, kv, hd),
              "layers.self_attn.v_proj": (d, kv, hd),
              "layers.self_attn.o_proj": (h, hd, d),
              "layers.block_sparse_moe.gate": (d, e),
              "layers.block_sparse_moe.w1": (e, d, f),
              "layers.block_sparse_moe.w3": (e, d, f),
              "layers.block_sparse_moe.w2": (e, f, d),
              "norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return {name: (shape, config.param_dtype) for name, shape in shapes.items()}


def param_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> its whole shape: `layer_shapes`, each decoder parameter stacked over the layers
    (`layers.self_attn.q_proj` [L, D, H, hd]), as the model holds them."""
    return {name: (config.num_hidden_layers, *shape) if name.startswith("layers.") else shape
            for name, (shape, _) in layer_shapes(config).items()}


def legacy_mappings(config: MixtralConfig) -> list[TensorMapping]:
    """Every tensor of the Hub's layout (what `save_pretrained` writes and releases use)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd, h, kv = config.resolved_head_dim, config.num_attention_heads, config.num_key_value_heads
    maps = [TensorMapping("model.embed_tokens.weight", "embed_tokens", (), (v, d), "copy"),
            TensorMapping("model.norm.weight", "norm.weight", (), (d,), "copy")]
    if not config.tie_word_embeddings:
        maps.append(TensorMapping("lm_head.weight", "lm_head", (), (v, d), "linear"))
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        maps += [
            TensorMapping(f"{p}.input_layernorm.weight", "layers.input_layernorm.weight", (layer,), (d,), "copy"),
            TensorMapping(f"{p}.post_attention_layernorm.weight", "layers.post_attention_layernorm.weight",
                          (layer,), (d,), "copy"),
            TensorMapping(f"{p}.self_attn.q_proj.weight", "layers.self_attn.q_proj", (layer,), (h * hd, d), "linear"),
            TensorMapping(f"{p}.self_attn.k_proj.weight", "layers.self_attn.k_proj", (layer,), (kv * hd, d), "linear"),
            TensorMapping(f"{p}.self_attn.v_proj.weight", "layers.self_attn.v_proj", (layer,), (kv * hd, d), "linear"),
            TensorMapping(f"{p}.self_attn.o_proj.weight", "layers.self_attn.o_proj", (layer,), (d, h * hd), "linear"),
            TensorMapping(f"{p}.block_sparse_moe.gate.weight", "layers.block_sparse_moe.gate", (layer,),
                          (config.num_local_experts, d), "linear"),
        ]
        for e in range(config.num_local_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            maps += [TensorMapping(f"{q}.w1.weight", "layers.block_sparse_moe.w1", (layer, e), (f, d), "linear"),
                     TensorMapping(f"{q}.w2.weight", "layers.block_sparse_moe.w2", (layer, e), (d, f), "linear"),
                     TensorMapping(f"{q}.w3.weight", "layers.block_sparse_moe.w3", (layer, e), (f, d), "linear")]
    return maps


def fused_mappings(config: MixtralConfig) -> list[TensorMapping]:
    """transformers 5's in-memory layout: `mlp.gate`, `mlp.experts.gate_up_proj` [E, 2F, D], `down_proj`."""
    d, f, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    maps = []
    for m in legacy_mappings(config):
        if ".block_sparse_moe.experts." in m.hf_key:
            continue
        maps.append(dataclasses.replace(m, hf_key=m.hf_key.replace(".block_sparse_moe.gate.", ".mlp.gate.")))
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts"
        maps += [TensorMapping(f"{p}.gate_up_proj", "layers.block_sparse_moe.w1", (layer,), (e, 2 * f, d), "fused_w1"),
                 TensorMapping(f"{p}.gate_up_proj", "layers.block_sparse_moe.w3", (layer,), (e, 2 * f, d), "fused_w3"),
                 TensorMapping(f"{p}.down_proj", "layers.block_sparse_moe.w2", (layer,), (e, d, f), "fused_w2")]
    return maps


def split_index(m: TensorMapping) -> tuple[int | None, tuple]:
    """(layer, index inside that layer's slice) of a mapping's index into the stacked parameter."""
    if m.param.startswith("layers."):
        return m.index[0], tuple(m.index[1:])
    return None, tuple(m.index)


def ordered_items(config: MixtralConfig) -> list[Item]:
    """Every layer-tensor, in the order of the legacy layout (layer by layer, as HF shards are ordered)."""
    return list(dict.fromkeys((m.param, split_index(m)[0]) for m in legacy_mappings(config)))


def hf_to_ours(mapping: TensorMapping, tensor: np.ndarray, target_shape: tuple) -> np.ndarray:
    f = mapping.hf_shape[1] // 2 if mapping.kind in ("fused_w1", "fused_w3") else None
    if mapping.kind == "copy":
        return tensor.reshape(target_shape)
    if mapping.kind == "linear":
        return tensor.T.reshape(target_shape)
    if mapping.kind == "fused_w1":
        return tensor[:, :f, :].transpose(0, 2, 1)
    if mapping.kind == "fused_w3":
        return tensor[:, f:, :].transpose(0, 2, 1)
    return tensor.transpose(0, 2, 1)  # fused_w2


def ours_to_hf(mapping: TensorMapping, array: np.ndarray) -> np.ndarray:
    if mapping.kind == "copy":
        return array.reshape(mapping.hf_shape)
    if mapping.kind == "linear":
        return array.reshape(mapping.hf_shape[1], mapping.hf_shape[0]).T
    raise ValueError(f"we write only the legacy layout, not {mapping.kind}")


def ours_to_hf_into(mapping: TensorMapping, array: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`ours_to_hf(mapping, array)` written into `out` (C-contiguous, HF shape, any dtype) without numpy's slow
    transposed copies."""
    if mapping.kind == "copy":
        out[...] = array.reshape(mapping.hf_shape)
        return out
    if mapping.kind == "linear":
        return transpose_into(array.reshape(mapping.hf_shape[1], mapping.hf_shape[0]), out)
    raise ValueError(f"we write only the legacy layout, not {mapping.kind}")


__all__ = ["Item", "TensorMapping", "fused_mappings", "hf_to_ours", "layer_shapes", "legacy_mappings",
           "ordered_items", "ours_to_hf", "ours_to_hf_into", "param_shapes", "split_index"]
