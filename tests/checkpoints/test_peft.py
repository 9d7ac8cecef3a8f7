"""PEFT adapter files: what we export, the real peft loads onto transformers' model with the same logits; what
peft's layout holds, we load back bit for bit; the config is peft's own; bad files are one clear error."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.checkpoints import run_manifest as runs
from mixtral_jax.checkpoints import run_state as checkpoint
from mixtral_jax.checkpoints.peft import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_peft_adapter,
    save_peft_adapter,
)
from mixtral_jax.cli.main import main
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.safetensors_files import SafetensorsFile, write_safetensors
from mixtral_jax.model.lora import LoraConfig, LoRAParam
from mixtral_jax.model.targets import LINEAR_WEIGHTS
from tests.model.test_lora import _randomise_b

MODULES = ("embed_tokens", "lm_head")


def _adapted_model(directory: str, lora: LoraConfig):
    """Random non-zero adapters and changed embed_tokens / lm_head, so that every exported tensor matters."""
    model = mj.from_pretrained(directory, lora=lora)
    _randomise_b(model)
    key = jax.random.key(7)
    for name in MODULES:
        key, sub = jax.random.split(key)
        variable = getattr(model, name)
        variable.set_value(variable[...] + 0.05 * jax.random.normal(sub, variable[...].shape))
    return model


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, vocab, (2, 11))


def _peft_logits(directory: str, adapter_dir: str, ids: np.ndarray, **peft_kwargs) -> np.ndarray:
    from peft import PeftModel
    from transformers import MixtralForCausalLM

    base = MixtralForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        model = PeftModel.from_pretrained(base, adapter_dir, **peft_kwargs).eval()
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def exported(reference_dirs, tmp_path_factory):
    """(HF dir, our adapted model, its adapter directory) for a GQA config with 4 experts."""
    _, directory = reference_dirs("gqa2_top2")
    model = _adapted_model(directory, LoraConfig(rank=4, alpha=8.0, dropout=0.0))
    adapter_dir = str(tmp_path_factory.mktemp("peft") / "adapter")
    save_peft_adapter(model, adapter_dir, MODULES, directory)
    return directory, model, adapter_dir


# config, adapter dropout: "mqa_top3" has head_dim * heads != hidden (flattening of q/o); dropout 0.05 is the
# recipe's, which peft refuses on transformers 5's fused experts unless overridden (see peft_adapters.py).
@pytest.mark.slow
@pytest.mark.parametrize("name, dropout", [("gqa2_top2", 0.0), ("mqa_top3", 0.05)])
def test_peft_loads_our_adapter_with_our_logits(reference_dirs, tmp_path, name, dropout):
    from peft import LoraConfig as PeftLoraConfig

    torch_model, directory = reference_dirs(name)
    model = _adapted_model(directory, LoraConfig(rank=4, alpha=8.0, dropout=dropout))
    save_peft_adapter(model, tmp_path / "adapter", MODULES, directory)
    ids = _ids(torch_model.config.vocab_size)
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    with torch.no_grad():
        base = torch_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter
    kwargs = {}
    if dropout:
        with pytest.raises(ValueError, match="lora_dropout"):  # peft 0.21's ParamWrapper (fused experts)
            _peft_logits(directory, str(tmp_path / "adapter"), ids)
        config = PeftLoraConfig.from_pretrained(str(tmp_path / "adapter"))
        config.lora_dropout = 0.0
        kwargs["config"] = config
    np.testing.assert_allclose(_peft_logits(directory, str(tmp_path / "adapter"), ids, **kwargs), ours,
                               atol=1e-4, rtol=0)


@pytest.mark.slow
def test_expert_adapters_are_per_expert_peft_tensors(exported):
    """Expert e's w1 pair is the transpose of our [e] slices (the key layout Chinese-Mixtral released)."""
    _, model, adapter_dir = exported
    file = SafetensorsFile(os.path.join(adapter_dir, WEIGHTS_FILE))
    moe = model.layers.block_sparse_moe
    key = "base_model.model.model.layers.1.block_sparse_moe.experts.2.w1.lora_{}.weight"
    np.testing.assert_array_equal(file.get(key.format("A")), np.asarray(moe.w1_lora_a[...])[1, 2].T)
    np.testing.assert_array_equal(file.get(key.format("B")), np.asarray(moe.w1_lora_b[...])[1, 2].T)
    config = model.config
    per_layer = 2 * (5 + 3 * config.num_local_experts)
    assert len(file.keys()) == config.num_hidden_layers * per_layer + len(MODULES)
    assert "base_model.model.lm_head.weight" in file.keys()
    assert "base_model.model.model.embed_tokens.weight" in file.keys()


@pytest.mark.slow
def test_import_gives_back_the_same_tensors_and_logits(exported):
    directory, model, adapter_dir = exported

    def trained(m):
        return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.iter_graph(m)
                if isinstance(v, LoRAParam) or (isinstance(v, nnx.Param) and p[0] in MODULES)}

    expected = trained(model)
    ids = jnp.asarray(_ids(model.config.vocab_size))
    for base in (directory, mj.from_pretrained(directory)):  # an HF directory, or a model already loaded
        loaded = load_peft_adapter(base, adapter_dir)
        assert loaded.lora == model.lora
        got = trained(loaded)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        np.testing.assert_array_equal(np.asarray(loaded(ids).logits), np.asarray(model(ids).logits))


def test_adapter_config_is_what_peft_writes(exported, tmp_path):
    """Field for field peft's LoraConfig as a PeftModel saves it; on transformers 5 a PeftModel rewrites the
    MoE targets to its fused parameters, so those four fields are compared with the LoraConfig saved alone."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import MixtralForCausalLM

    directory, _, adapter_dir = exported
    with open(os.path.join(adapter_dir, CONFIG_FILE)) as f:
        ours = json.load(f)

    def peft_config():
        return PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LINEAR_WEIGHTS),
                              modules_to_save=list(MODULES), task_type="CAUSAL_LM")

    get_peft_model(MixtralForCausalLM.from_pretrained(directory), peft_config()).save_pretrained(tmp_path / "model")
    with open(tmp_path / "model" / CONFIG_FILE) as f:
        from_model = json.load(f)
    converted = {"target_modules", "target_parameters", "rank_pattern", "alpha_pattern"}
    assert ours.keys() == from_model.keys()
    assert {k: v for k, v in ours.items() if k not in converted} == \
        {k: v for k, v in from_model.items() if k not in converted}

    alone = peft_config()
    alone.inference_mode, alone.base_model_name_or_path = True, directory  # what PeftModel.save_pretrained sets
    alone.save_pretrained(tmp_path / "alone")
    with open(tmp_path / "alone" / CONFIG_FILE) as f:
        from_config = json.load(f)
    assert sorted(ours.pop("target_modules")) == sorted(from_config.pop("target_modules"))
    assert ours == from_config


def _copy_adapter(adapter_dir: str, out, config_edit=None, tensor_edit=None) -> str:
    os.makedirs(out)
    with open(os.path.join(adapter_dir, CONFIG_FILE)) as f:
        config = json.load(f)
    if config_edit:
        config_edit(config)
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump(config, f)
    file = SafetensorsFile(os.path.join(adapter_dir, WEIGHTS_FILE))
    tensors = {k: np.asarray(file.get(k)) for k in file.keys()}
    if tensor_edit:
        tensor_edit(tensors)
    write_safetensors(os.path.join(out, WEIGHTS_FILE), tensors)
    return str(out)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("r"), r"adapter_config.json: field 'r' is missing"),
    (lambda c: c.pop("target_modules"), r"field 'target_modules' is missing"),
    (lambda c: c.update(peft_type="LOHA"), r"field 'peft_type' is 'LOHA'"),
    (lambda c: c.update(lora_alpha="16"), r"field 'lora_alpha' must be a number"),
    (lambda c: c.update(target_modules=["q_proj", "mlp"]), r"field 'target_modules' names 'mlp'"),
    (lambda c: c.update(use_rslora=True), r"field 'use_rslora' is True"),
    (lambda c: c.update(target_parameters=["gate_up_proj"]), r"field 'target_parameters'"),
])
def test_bad_adapter_config_names_the_file_and_field(exported, tmp_path, edit, message):
    directory, _, adapter_dir = exported
    bad = _copy_adapter(adapter_dir, tmp_path / "bad", config_edit=edit)
    with pytest.raises(CheckpointError, match=message):
        load_peft_adapter(directory, bad)


def test_shape_mismatch_and_unknown_tensor_are_named(exported, tmp_path):
    directory, _, adapter_dir = exported
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    bad = _copy_adapter(adapter_dir, tmp_path / "shape",
                        tensor_edit=lambda t: t.update({key: np.zeros((4, 33), np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(f"'{key}' has shape [4, 33]; the base model (r=4) needs "
                                                        f"[4, 32]")):
        load_peft_adapter(directory, bad)
    extra = "base_model.model.model.norm.weight"
    bad = _copy_adapter(adapter_dir, tmp_path / "extra",
                        tensor_edit=lambda t: t.update({extra: np.ones(32, np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(f"unexpected tensor '{extra}'")):
        load_peft_adapter(directory, bad)


def test_existing_out_dir_is_refused_unless_overwrite(exported, tmp_path):
    _, model, _ = exported
    out = tmp_path / "adapter"
    os.makedirs(out)
    with pytest.raises(CheckpointError, match="already exists"):
        save_peft_adapter(model, out)
    save_peft_adapter(model, out, overwrite=True)
    assert sorted(os.listdir(out)) == [CONFIG_FILE, WEIGHTS_FILE]
    assert os.listdir(tmp_path) == ["adapter"]  # no temporary or old directory left beside it


@pytest.mark.slow
def test_cli_exports_a_run_and_imports_the_adapter(exported, tmp_path, capsys):
    """export-peft takes a run's latest trained weights and manifest; import-peft loads them onto the base."""
    directory, model, _ = exported
    run_model = runs.RunModel(base=directory, dtype="float32", lora=dict(rank=4, alpha=8.0, dropout=0.0),
                                    modules_to_save=MODULES)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    runs.write_manifest(run_dir, run_model)
    manager = checkpoint.open_manager(run_dir, async_save=False)
    checkpoint.save(manager, 3, nnx.state(model, run_model.trainable()), {"count": jnp.int32(3)}, {"step": 3})
    manager.close()

    out = str(tmp_path / "adapter")
    assert main(["convert", "export-peft", run_dir, out]) == 0
    with open(os.path.join(out, CONFIG_FILE)) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(directory)
    ids = jnp.asarray(_ids(model.config.vocab_size))
    np.testing.assert_array_equal(np.asarray(load_peft_adapter(directory, out)(ids).logits),
                                  np.asarray(model(ids).logits))
    assert main(["convert", "export-peft", run_dir, out]) == 2  # exists, no --overwrite: one line
    capsys.readouterr()
    assert main(["convert", "import-peft", out, "--base", directory, "--check"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["tensors"], summary["r"], summary["lora_alpha"], summary["logits_finite"]) == (70, 4, 8.0, True)
