"""HF checkpoints: loading the legacy, fused (transformers 5) and sharded layouts, saving, and clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from mixtral_jax.checkpoints.hf_model import save_pretrained
from mixtral_jax.checkpoints.name_map import legacy_mappings
from mixtral_jax.checkpoints.pretrained import from_pretrained
from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError, ConfigError
from mixtral_jax.io.safetensors_files import SafetensorsFile

NAME = "gqa2_top2"  # one config is enough here; the parity tests cover the others
SHARD_BYTES = 20_000  # the tiny model is ~160 KB in fp32: this gives several shards
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# ------------------------------------------------------------------------------------------------ helpers
@nnx.jit
def _logits(model, input_ids):
    return model(input_ids).logits


def logits_of(model) -> np.ndarray:
    return np.asarray(_logits(model, INPUT_IDS))


INPUT_IDS = np.random.default_rng(1).integers(0, 128, size=(2, 9)).astype(np.int32)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS, dtype=torch.long)).logits.float().numpy()


def params_of(model) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_params_bit_identical(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and pa[name].shape == pb[name].shape, name
        assert pa[name].tobytes() == pb[name].tobytes(), f"{name} differs"


def same_architecture(a: MixtralConfig, b: MixtralConfig) -> bool:
    """Equal configs, except that head_dim None (derived) and its explicit value count as the same."""
    return a.replace(head_dim=a.resolved_head_dim) == b.replace(head_dim=b.resolved_head_dim)


def read_dir(directory) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, single file or sharded, read with the reference safetensors package."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(directory, name))
            assert not set(tensors) & set(out), f"tensor in two files of {directory}"
            out.update(tensors)
    return out


def temp_siblings(path) -> list[str]:
    parent, base = os.path.split(os.fspath(path))
    return [n for n in os.listdir(parent) if n != base and n.startswith(f".{base}")]


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def assert_one_clear_message(err: pytest.ExceptionInfo, *needles: str):
    """One exception, one line, not chained onto another error, naming every needle."""
    message = str(err.value)
    assert "\n" not in message, message
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference(reference_dirs):
    """(transformers model, the directory transformers saved, its logits on INPUT_IDS)."""
    model, directory = reference_dirs(NAME)
    return model, directory, torch_logits(model)


@pytest.fixture(scope="module")
def legacy_model(reference):
    return from_pretrained(reference[1])


@pytest.fixture(scope="module")
def legacy_logits(legacy_model):
    return logits_of(legacy_model)


@pytest.fixture(scope="module")
def sharded_dir(legacy_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded") / "out"
    save_pretrained(legacy_model, directory, max_shard_bytes=SHARD_BYTES)
    return str(directory)


# ------------------------------------------------------------------------------------------------ legacy layout
def test_transformers_saves_the_legacy_layout(reference):
    _, directory, _ = reference
    assert sorted(n for n in os.listdir(directory) if n.endswith(".safetensors")) == ["model.safetensors"]
    keys = set(SafetensorsFile(os.path.join(directory, "model.safetensors")).keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    config = MixtralConfig.from_hf(directory)
    assert keys == {m.hf_key for m in legacy_mappings(config)}


@pytest.mark.slow
def test_legacy_logits_match_transformers(reference, legacy_model, legacy_logits):
    _, directory, ref_logits = reference
    assert legacy_model.config == MixtralConfig.from_hf(directory)
    assert legacy_model.config.param_dtype == "float32"
    assert legacy_logits.shape == ref_logits.shape
    np.testing.assert_allclose(legacy_logits, ref_logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ fused layout
def test_fused_layout_loads_bit_identical(reference, legacy_model, tmp_path):
    hf_model, directory, _ = reference
    state = hf_model.state_dict()
    cfg = hf_model.config
    e, f, d = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
    # transformers 5 keeps the experts fused in memory.
    assert tuple(state["model.layers.0.mlp.gate.weight"].shape) == (e, d)
    assert tuple(state["model.layers.0.mlp.experts.gate_up_proj"].shape) == (e, 2 * f, d)
    assert tuple(state["model.layers.0.mlp.experts.down_proj"].shape) == (e, d, f)
    assert not any("block_sparse_moe" in k for k in state)

    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    shutil.copy(os.path.join(directory, "config.json"), fused / "config.json")
    model = from_pretrained(fused)
    assert_params_bit_identical(model, legacy_model)

    # and the split is w1 rows first, then w3
    legacy = load_file(os.path.join(directory, "model.safetensors"))
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(gate_up[2, :f], legacy["model.layers.1.block_sparse_moe.experts.2.w1.weight"])
    assert torch.equal(gate_up[2, f:], legacy["model.layers.1.block_sparse_moe.experts.2.w3.weight"])


# ------------------------------------------------------------------------------------------------ sharded
def test_sharded_save_writes_shards_and_index(sharded_dir, reference):
    names = sorted(os.listdir(sharded_dir))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3, names
    matches = [SHARD_RE.fullmatch(n) for n in shards]
    assert all(matches), shards
    total = int(matches[0].group(2))
    assert total == len(shards)
    assert [int(m.group(1)) for m in matches] == list(range(1, total + 1))
    assert "model.safetensors" not in names
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(names)
    assert not temp_siblings(sharded_dir)

    with open(os.path.join(sharded_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    expected = set(SafetensorsFile(os.path.join(reference[1], "model.safetensors")).keys())
    assert set(weight_map) == expected
    sizes = 0
    for shard in shards:
        file = SafetensorsFile(os.path.join(sharded_dir, shard))
        assert {k for k, v in weight_map.items() if v == shard} == set(file.keys())
        shard_bytes = sum(file.get(k).nbytes for k in file.keys())
        sizes += shard_bytes
        assert shard_bytes <= SHARD_BYTES or len(file.keys()) == 1
    assert index["metadata"]["total_size"] == sizes


def test_sharded_loads_bit_identical(sharded_dir, legacy_model, legacy_logits):
    model = from_pretrained(sharded_dir)
    assert same_architecture(model.config, legacy_model.config)
    assert_params_bit_identical(model, legacy_model)
    np.testing.assert_array_equal(logits_of(model), legacy_logits)


def test_transformers_loads_our_sharded_output(sharded_dir, legacy_logits, reference):
    from transformers import MixtralForCausalLM

    hf_model = MixtralForCausalLM.from_pretrained(sharded_dir, dtype=torch.float32).eval()
    assert hf_model.config.num_local_experts == reference[0].config.num_local_experts
    np.testing.assert_allclose(torch_logits(hf_model), legacy_logits, atol=1e-4, rtol=0)
    # nothing was silently left at its initial value
    for key, value in reference[0].state_dict().items():
        assert torch.equal(hf_model.state_dict()[key], value), key


def test_single_file_save_without_shard_limit(legacy_model, tmp_path):
    out = tmp_path / "single"
    save_pretrained(legacy_model, out)
    names = sorted(os.listdir(out))
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    assert_params_bit_identical(from_pretrained(out), legacy_model)


# ------------------------------------------------------------------------------------------------ round trips
def test_save_round_trip_fp32_bit_exact(reference, legacy_model, tmp_path):
    _, directory, _ = reference
    out = tmp_path / "fp32"
    save_pretrained(legacy_model, out)
    theirs, ours = read_dir(directory), read_dir(out)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == torch.float32, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key].view(torch.int32), theirs[key].view(torch.int32)), key
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert same_architecture(MixtralConfig.from_hf(out), MixtralConfig.from_hf(directory))
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_save_round_trip_bf16(reference, tmp_path):
    _, directory, _ = reference
    model = from_pretrained(directory, dtype="bfloat16")
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    assert all(p.dtype == np.dtype(ml_dtypes.bfloat16) for p in params_of(model).values())
    out = tmp_path / "bf16"
    save_pretrained(model, out)
    theirs, ours = read_dir(directory), read_dir(out)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        expected = theirs[key].to(torch.bfloat16)
        assert ours[key].dtype == torch.bfloat16, key
        assert torch.equal(ours[key].view(torch.int16), expected.view(torch.int16)), key
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # a bf16 checkpoint loads in bf16 by default, to the same parameters
    assert_params_bit_identical(from_pretrained(out), model)


def test_save_with_dtype_argument(legacy_model, reference, tmp_path):
    out = tmp_path / "cast"
    save_pretrained(legacy_model, out, dtype="bfloat16")
    theirs, ours = read_dir(reference[1]), read_dir(out)
    for key in theirs:
        assert torch.equal(ours[key].view(torch.int16), theirs[key].to(torch.bfloat16).view(torch.int16)), key


# ------------------------------------------------------------------------------------------------ safety
def test_save_refuses_existing_dir_unless_overwrite(legacy_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError) as err:
        save_pretrained(legacy_model, out)
    assert_one_clear_message(err, str(out), "overwrite")
    assert os.listdir(out) == ["keep.txt"]
    assert not temp_siblings(out)

    save_pretrained(legacy_model, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not temp_siblings(out)
    assert_params_bit_identical(from_pretrained(out), legacy_model)


def test_failed_save_leaves_nothing_behind(legacy_model, tmp_path, monkeypatch):
    from mixtral_jax.io import direct_files as direct_io

    calls = []
    real_init = direct_io.DirectFile.__init__

    def failing_open(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(direct_io.DirectFile, "__init__", failing_open)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(legacy_model, fresh, max_shard_bytes=SHARD_BYTES)
    assert len(calls) == 2
    assert not fresh.exists()
    assert not temp_siblings(fresh)

    # replacing an existing checkpoint that fails half way leaves the old one intact
    monkeypatch.undo()
    existing = tmp_path / "existing"
    save_pretrained(legacy_model, existing)
    before = {n: (existing / n).read_bytes() for n in os.listdir(existing)}
    calls.clear()
    monkeypatch.setattr(direct_io.DirectFile, "__init__", failing_open)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(legacy_model, existing, max_shard_bytes=SHARD_BYTES, overwrite=True)
    assert {n: (existing / n).read_bytes() for n in os.listdir(existing)} == before
    assert not temp_siblings(existing)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_truncated_safetensors(reference, tmp_path):
    bad = copy_dir(reference[1], tmp_path / "bad")
    path = os.path.join(bad, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, path, "truncated")
    assert re.search(r"tensor '[\w.]+'", str(err.value)), str(err.value)


def test_truncated_shard(sharded_dir, tmp_path):
    bad = copy_dir(sharded_dir, tmp_path / "bad")
    shard = sorted(n for n in os.listdir(bad) if n.endswith(".safetensors"))[1]
    path = os.path.join(bad, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, path, "truncated")


def test_config_with_missing_field(reference, tmp_path):
    bad = copy_dir(reference[1], tmp_path / "bad")
    path = os.path.join(bad, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["num_local_experts"]
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ConfigError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, path, "num_local_experts")


def test_config_not_json(reference, tmp_path):
    bad = copy_dir(reference[1], tmp_path / "bad")
    path = os.path.join(bad, "config.json")
    with open(path, "w") as f:
        f.write('{"vocab_size": 128,')
    with pytest.raises(ConfigError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, path)


def test_missing_config(reference, tmp_path):
    bad = copy_dir(reference[1], tmp_path / "bad")
    os.remove(os.path.join(bad, "config.json"))
    with pytest.raises(ConfigError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, os.path.join(bad, "config.json"))


def test_index_names_a_missing_shard(sharded_dir, tmp_path):
    bad = copy_dir(sharded_dir, tmp_path / "bad")
    shard = sorted(n for n in os.listdir(bad) if n.endswith(".safetensors"))[-1]
    os.remove(os.path.join(bad, shard))
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    index = os.path.join(bad, "model.safetensors.index.json")
    with open(index) as f:
        some_key = sorted(k for k, v in json.load(f)["weight_map"].items() if v == shard)
    assert_one_clear_message(err, index, shard)
    assert any(k in str(err.value) for k in some_key)


def test_index_names_a_tensor_its_shard_lacks(sharded_dir, tmp_path):
    bad = copy_dir(sharded_dir, tmp_path / "bad")
    index = os.path.join(bad, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    shards = sorted(set(data["weight_map"].values()))
    key = next(k for k, v in data["weight_map"].items() if v == shards[0])
    data["weight_map"][key] = shards[1]  # the index now points to the wrong shard
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, index, key)


def _rewrite(directory, change) -> str:
    """Rewrites the single model.safetensors of `directory` with `change(dict)` applied; returns its path."""
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_tensor_with_wrong_shape(reference, tmp_path):
    bad = copy_dir(reference[1], tmp_path / "bad")
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"

    def change(t):
        t[key] = t[key][:-1].contiguous()  # one row short

    path = _rewrite(bad, change)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, path, key, "[63, 32]", "[64, 32]")


@pytest.mark.parametrize("key, shape", [
    ("model.layers.0.self_attn.q_norm.weight", (8,)),
    ("model.layers.2.input_layernorm.weight", (32,)),  # more layers than config.json says: refused, not truncated
])
def test_unexpected_extra_tensor(reference, tmp_path, key, shape):
    bad = copy_dir(reference[1], tmp_path / "bad")

    def change(t):
        t[key] = torch.ones(shape)

    path = _rewrite(bad, change)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, path, key, "unexpected")


def test_missing_tensor(reference, tmp_path):
    bad = copy_dir(reference[1], tmp_path / "bad")
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    def change(t):
        del t[key]

    _rewrite(bad, change)
    with pytest.raises(CheckpointError) as err:
        from_pretrained(bad)
    assert_one_clear_message(err, bad, key, "missing")


def test_rotary_inv_freq_is_ignored(reference, legacy_model, tmp_path):
    """Old Hub checkpoints carry `rotary_emb.inv_freq` buffers; they are derived, so skipped."""
    bad = copy_dir(reference[1], tmp_path / "old")

    def change(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    _rewrite(bad, change)
    assert_params_bit_identical(from_pretrained(bad), legacy_model)


def test_not_a_directory_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path / "absent")
    assert_one_clear_message(err, str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as err:  # config.json is read first
        from_pretrained(tmp_path / "empty")
    assert_one_clear_message(err, str(tmp_path / "empty" / "config.json"), "not found")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(MixtralConfig.from_preset("tiny").to_hf()))
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path / "empty")
    assert_one_clear_message(err, str(tmp_path / "empty"), "model.safetensors")


@pytest.mark.slow
def test_loading_streams_peak_host_memory_stays_near_the_model_size(tmp_path):
    """A 160 MB fp32 checkpoint loads in a fresh process with peak RSS growth well under twice its size."""
    import subprocess
    import sys
    import textwrap

    from convert.init import init_random

    directory = str(tmp_path / "model")
    init_random(directory, "tiny", seed=0, overrides=["hidden_size=256", "intermediate_size=1024",
                                                      "num_hidden_layers=4", "num_attention_heads=8",
                                                      "num_key_value_heads=4"])
    model_bytes = os.path.getsize(os.path.join(directory, "model.safetensors"))
    script = textwrap.dedent(f"""
        import resource, jax, jax.numpy as jnp
        import mixtral_jax as mj
        jnp.ones(8).block_until_ready()  # backends up before the baseline
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = mj.from_pretrained({directory!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.strip().splitlines()[-1])
    assert model_bytes > 150e6
    assert growth < 1.5 * model_bytes, (growth, model_bytes)


def test_reads_ahead_on_several_threads_write_the_same_bytes(legacy_model, tmp_path, monkeypatch):
    """Reads that finish out of order, into reused buffers (a ring for every size here), change nothing."""
    import functools
    import time

    from mixtral_jax.checkpoints import hf_files
    from mixtral_jax.checkpoints.sources import ModelSource
    from mixtral_jax.io import direct_files as direct_io
    from mixtral_jax.io import read_ahead as read_ahead_module
    from mixtral_jax.io.buffers import BufferRing

    monkeypatch.setattr(read_ahead_module, "BufferRing", functools.partial(BufferRing, min_bytes=0))
    source = ModelSource(legacy_model)
    delays = iter(np.random.default_rng(0).uniform(0, 0.01, 10_000))

    def slow_part(param, layer, inner, out=None):
        time.sleep(next(delays))
        return source.read_part(param, layer, inner, out)

    real_write = direct_io.DirectFile.write

    def slow_write(self, data):  # a tensor stays "being written" while the next reads fill their buffers
        time.sleep(0.005)
        real_write(self, data)

    monkeypatch.setattr(direct_io.DirectFile, "write", slow_write)

    written = {}
    for read_ahead in (1, 3):
        out = tmp_path / f"ahead{read_ahead}"
        hf_files.write_pretrained(legacy_model.config, source.read, out, read_part=slow_part,
                                  read_ahead=read_ahead, max_shard_bytes=20_000)
        written[read_ahead] = read_dir(out)
    assert written[1].keys() == written[3].keys() and len(written[1]) > 10
    for key, tensor in written[1].items():
        assert torch.equal(tensor, written[3][key]), key
