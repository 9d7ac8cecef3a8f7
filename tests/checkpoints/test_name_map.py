"""layout.py: the shapes it computes from a config without Flax are the Flax model's, and every parameter is
filled by the HF mappings exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from mixtral_jax.checkpoints.name_map import (
    fused_mappings,
    layer_shapes,
    legacy_mappings,
    ordered_items,
)
from mixtral_jax.checkpoints.placement import named_params
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.transformer import Mixtral
from tests.conftest import REFERENCE_CONFIGS


def configs():
    yield "tiny", MixtralConfig.from_preset("tiny")
    yield "tied-bf16", MixtralConfig.from_preset("tiny").replace(tie_word_embeddings=True, dtype="bfloat16",
                                                                  param_dtype="bfloat16")
    for name, fields in REFERENCE_CONFIGS.items():
        yield name, MixtralConfig.from_dict(fields)


@pytest.mark.parametrize("name,config", list(configs()), ids=[name for name, _ in configs()])
def test_layer_shapes_are_the_models(name, config):
    model = nnx.eval_shape(lambda: Mixtral(config, rngs=nnx.Rngs(0)))
    expected = {}
    for param, variable in named_params(model):
        value = variable.get_value()
        shape = value.shape[1:] if param.startswith("layers.") else value.shape
        expected[param] = (tuple(shape), str(value.dtype))
    assert layer_shapes(config) == expected


@pytest.mark.parametrize("mappings", [legacy_mappings, fused_mappings])
def test_mappings_fill_every_parameter_once(mappings):
    config = MixtralConfig.from_dict(REFERENCE_CONFIGS["mha_top1_hd16"])
    shapes = layer_shapes(config)
    filled = {name: np.zeros((config.num_hidden_layers, *shape) if name.startswith("layers.") else shape, np.int32)
              for name, (shape, _) in shapes.items()}
    for m in mappings(config):
        target = filled[m.param][m.index]
        if m.kind.startswith("fused_"):  # [E, 2F, D] or [E, D, F] fills all experts of one layer-tensor
            assert target.size == int(np.prod(m.hf_shape)) // (2 if m.kind != "fused_w2" else 1)
        else:
            assert target.size == int(np.prod(m.hf_shape)), m.hf_key
        target += 1
    for name, counts in filled.items():
        assert (counts == 1).all(), name
    assert sorted(set(ordered_items(config))) == sorted(
        (name, layer) for name in shapes for layer in (range(config.num_hidden_layers) if name.startswith("layers.")
                                                        else [None]))
