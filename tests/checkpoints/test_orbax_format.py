"""Orbax model checkpoints: HF -> Orbax -> HF bit-identical (fp32/bf16, one file/sharded, legacy/fused), restore
onto a mesh, the NF4 base stored packed, and the stored layout."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from convert.orbax_hf import orbax_to_hf
from mixtral_jax.checkpoints import orbax_format as orbax_model
from mixtral_jax.checkpoints.hf_model import save_pretrained
from mixtral_jax.checkpoints.hf_to_orbax import convert_hf
from mixtral_jax.checkpoints.nf4_layers import as_leaves
from mixtral_jax.checkpoints.orbax_keys import flatten, nest
from mixtral_jax.checkpoints.placement import named_params
from mixtral_jax.checkpoints.pretrained import from_pretrained
from mixtral_jax.config import MixtralConfig
from mixtral_jax.model.nf4_base import quantize_base, quantize_model
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.parallel.sharding import make_mesh
from mixtral_jax.quantization.nf4_weight import NF4Weight, dequantize_weight

NAME = "gqa2_top2"
INPUT_IDS = np.random.default_rng(1).integers(0, 128, size=(2, 9)).astype(np.int32)


@nnx.jit
def _logits(model, input_ids):
    return model(input_ids).logits


def logits_of(model) -> np.ndarray:
    return np.asarray(_logits(model, INPUT_IDS))


def read_dir(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def as_legacy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The legacy (per-expert) names and tensors of a checkpoint in either layout."""
    out = {}
    for key, t in tensors.items():
        if ".mlp.experts.gate_up_proj" in key:
            prefix = key.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = t[e, :f]
                out[f"{prefix}.{e}.w3.weight"] = t[e, f:]
        elif ".mlp.experts.down_proj" in key:
            prefix = key.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = t[e]
        else:
            out[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
    return out


def write_fused(legacy_dir: str, out: str, dtype=torch.float32, shard_bytes: int | None = None) -> str:
    """transformers 5's fused layout (gate_up_proj [E, 2F, D], down_proj [E, D, F]) from a legacy directory."""
    legacy = read_dir(legacy_dir)
    config = MixtralConfig.from_hf(legacy_dir)
    fused = {}
    for key, t in legacy.items():
        if ".block_sparse_moe.experts." not in key:
            fused[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t.to(dtype).contiguous()
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        experts = range(config.num_local_experts)
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([legacy[f"{p}.{e}.w1.weight"], legacy[f"{p}.{e}.w3.weight"]]) for e in experts]).to(dtype)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [legacy[f"{p}.{e}.w2.weight"] for e in experts]).to(dtype)
    os.makedirs(out)
    keys = sorted(fused)
    if shard_bytes is None:
        save_file(fused, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    else:
        shards, current, size = [], [], 0
        for key in keys:
            nbytes = fused[key].numel() * fused[key].element_size()
            if current and size + nbytes > shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append(key)
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: fused[k] for k in shard}, os.path.join(out, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(legacy_dir, "config.json")) as f:
        config_json = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**config_json, "torch_dtype": str(dtype).removeprefix("torch.")}, f)
    return out


@pytest.fixture(scope="module")
def sources(reference_dirs, tmp_path_factory):
    """layout/dtype/files -> an HF directory in that form, all holding the same model."""
    _, legacy_fp32 = reference_dirs(NAME)  # transformers 5 saves the legacy layout
    root = tmp_path_factory.mktemp("sources")
    model = from_pretrained(legacy_fp32)
    save_pretrained(model, root / "legacy_bf16_sharded", dtype="bfloat16", max_shard_bytes=30_000)
    return {
        "legacy-fp32-single": legacy_fp32,
        "legacy-bf16-sharded": str(root / "legacy_bf16_sharded"),
        "fused-fp32-sharded": write_fused(legacy_fp32, str(root / "fused_fp32_sharded"), shard_bytes=40_000),
        "fused-bf16-single": write_fused(legacy_fp32, str(root / "fused_bf16_single"), torch.bfloat16),
    }


@pytest.fixture(scope="module")
def orbax_dir(sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("orbax") / "model")
    convert_hf(sources["legacy-fp32-single"], out)
    return out


@pytest.mark.parametrize("form", ["legacy-fp32-single", "legacy-bf16-sharded", "fused-fp32-sharded",
                                  "fused-bf16-single"])
def test_hf_orbax_hf_is_bit_identical(sources, tmp_path, form):
    source = sources[form]
    assert any(".mlp.experts." in k for k in read_dir(source)) == form.startswith("fused")
    convert_hf(source, tmp_path / "orbax")
    orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "hf"), max_shard_size=25_000, show_progress=False)
    expected, written = as_legacy(read_dir(source)), read_dir(tmp_path / "hf")
    assert len([n for n in os.listdir(tmp_path / "hf") if n.endswith(".safetensors")]) > 1
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
    assert written.keys() == expected.keys()
    for key in expected:
        assert written[key].dtype == expected[key].dtype, key
        assert written[key].shape == expected[key].shape, key
        assert torch.equal(written[key].view(torch.int16 if written[key].dtype == torch.bfloat16 else torch.int32),
                           expected[key].contiguous().view(torch.int16 if expected[key].dtype == torch.bfloat16
                                                           else torch.int32)), key
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["torch_dtype"] == ("bfloat16" if "bf16" in form else "float32")


def _part_trees(orbax_dir) -> list[dict]:
    import orbax.checkpoint.experimental.v1 as ocp

    marker = json.load(open(os.path.join(orbax_dir, orbax_model.MARKER)))
    return [ocp.metadata(os.path.join(orbax_dir, part)).metadata for part in orbax_model.weight_parts(marker)]


def test_layout_on_disk(orbax_dir):
    marker = json.load(open(os.path.join(orbax_dir, orbax_model.MARKER)))
    assert marker["format"] == orbax_model.FORMAT and marker["quantize"] == "none"
    assert marker["dtype"] == "float32" and marker["num_hidden_layers"] == 2
    assert marker["version"] == orbax_model.VERSION == 3 and marker["weights"] == ["weights"]
    assert orbax_model.is_orbax_model(orbax_dir)
    (part,) = _part_trees(orbax_dir)
    tree: dict = {}
    for keys, leaf in flatten(part).items():
        nest(keys, leaf, tree)
    assert sorted(tree["layers"]) == ["000", "001"]
    w1 = tree["layers"]["001"]["block_sparse_moe"]["w1"]  # one key per expert
    assert sorted(w1) == ["000", "001", "002", "003"] and tuple(w1["002"].shape) == (32, 64)
    assert tuple(tree["layers"]["000"]["block_sparse_moe"]["w2"]["003"].shape) == (64, 32)
    assert tuple(tree["layers"]["000"]["self_attn"]["q_proj"].shape) == (32, 4, 8)
    assert tuple(tree["embed_tokens"].shape) == (128, 32) and tuple(tree["lm_head"].shape) == (32, 128)
    state = os.path.join(orbax_dir, "weights", "state")  # orbax_files' layout: a zarr3 array per key, no OCDBT
    assert os.path.isfile(os.path.join(state, "layers.001.block_sparse_moe.w1.002", "c", "0", "0"))
    assert not os.path.exists(os.path.join(state, "manifest.ocdbt"))
    assert not [n for n in os.listdir(os.path.dirname(orbax_dir)) if n.startswith(".")]


def test_reused_read_buffers_keep_every_leaf(sources, orbax_dir, tmp_path, monkeypatch):
    """hf-to-orbax reads into a ring of reused buffers; here every leaf goes through it (the model's arrays
    are below its 16 MB floor), so a buffer handed back before its leaf was written would show."""
    from mixtral_jax.io import read_ahead
    from mixtral_jax.io.buffers import BufferRing

    monkeypatch.setattr(read_ahead, "BufferRing", lambda depth: BufferRing(depth, min_bytes=0, max_shapes=1))
    convert_hf(sources["legacy-bf16-sharded"], tmp_path / "ring")
    reference, ring = orbax_model.OrbaxSource(orbax_dir), orbax_model.OrbaxSource(str(tmp_path / "ring"))
    for item in reference.items():
        expected = reference.read(*item).astype(ring.read(*item).dtype)  # the reference is fp32
        assert np.array_equal(ring.read(*item).view(np.uint8), expected.view(np.uint8)), item


@pytest.mark.slow
def test_two_part_ocdbt_checkpoints_of_earlier_versions_are_still_read(orbax_dir, tmp_path):
    """Until 2026-11-27 hf-to-orbax dealt the keys round-robin to two Orbax checkpoints (`weights/0`,
    `weights/1`), each written by Orbax's own saves (OCDBT)."""
    import shutil

    import orbax.checkpoint.experimental.v1 as ocp

    old = tmp_path / "old"
    shutil.copytree(orbax_dir, old, ignore=shutil.ignore_patterns("weights"))
    leaves = list(flatten(ocp.load(os.path.join(orbax_dir, "weights"))).items())
    for k in range(2):
        part: dict = {}
        for keys, leaf in leaves[k::2]:
            nest(keys, leaf, part)
        ocp.save(old / "weights" / str(k), part)
    assert os.path.isfile(old / "weights" / "0" / "state" / "manifest.ocdbt")
    marker = json.load(open(old / orbax_model.MARKER))
    json.dump({**marker, "weights": ["weights/0", "weights/1"]}, open(old / orbax_model.MARKER, "w"))
    want = jax.tree.map(np.asarray, nnx.state(from_pretrained(orbax_dir), nnx.Param))
    got = jax.tree.map(np.asarray, nnx.state(from_pretrained(str(old)), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, want, got)
    new, earlier = orbax_model.OrbaxSource(orbax_dir), orbax_model.OrbaxSource(str(old))  # read through Orbax
    for item in [("layers.block_sparse_moe.w2", 1), ("lm_head", None), ("layers.self_attn.o_proj", 0)]:
        np.testing.assert_array_equal(earlier.read(*item), new.read(*item))


def test_host_reads_of_our_layout_bypass_orbax(orbax_dir, monkeypatch):
    """OrbaxSource (the converters back to HF, verify) reads our files with plain reads (orbax_files.read_into)."""
    want = orbax_model.OrbaxSource(orbax_dir).read("layers.block_sparse_moe.w1", 1)

    def no_orbax(*args):
        raise AssertionError("Orbax was asked")

    monkeypatch.setattr(orbax_model, "_load", no_orbax)
    source = orbax_model.OrbaxSource(orbax_dir)
    np.testing.assert_array_equal(source.read("layers.block_sparse_moe.w1", 1), want)
    assert source.read("embed_tokens", None).shape == (128, 32)


def test_read_part_fills_a_buffer_that_fits_and_never_casts(sources, orbax_dir):
    from mixtral_jax.checkpoints.sources import HFSource

    for source in (orbax_model.OrbaxSource(orbax_dir), HFSource(sources["legacy-fp32-single"])):
        want = source.read("layers.block_sparse_moe.w2", 1)[2]
        out = np.zeros(want.shape, want.dtype)
        assert source.read_part("layers.block_sparse_moe.w2", 1, (2,), out) is out
        np.testing.assert_array_equal(out, want)
        wrong = np.zeros(want.shape, np.float16)
        got = source.read_part("layers.block_sparse_moe.w2", 1, (2,), wrong)
        assert got is not wrong and got.dtype == want.dtype and not wrong.any()
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_version_1_single_part_is_still_read(orbax_dir, tmp_path):
    """Version 1 wrote one Orbax checkpoint at OUT/weights and named it as a string."""
    import shutil

    out = tmp_path / "v1"
    shutil.copytree(orbax_dir, out)
    marker = json.load(open(out / orbax_model.MARKER))
    json.dump({**marker, "version": 1, "weights": "weights"}, open(out / orbax_model.MARKER, "w"))
    np.testing.assert_array_equal(logits_of(from_pretrained(str(out))), logits_of(from_pretrained(orbax_dir)))


def test_missing_weight_part_is_named(orbax_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(orbax_dir, broken)
    shutil.rmtree(broken / "weights")
    with pytest.raises(orbax_model.CheckpointError, match=r"orbax_model.json: field 'weights' names 'weights'"):
        from_pretrained(str(broken))


def test_loading_logs_no_malformed_checkpoint_warning(orbax_dir, caplog):
    """Orbax warns on every load of a checkpoint without OCDBT (it looks for zarr2 files); the reader drops
    that one warning."""
    with caplog.at_level("WARNING"):
        from_pretrained(orbax_dir)
    assert not [r for r in caplog.records if "data files not found" in r.getMessage()]


@pytest.mark.slow
def test_restore_equals_hf_load_and_goes_onto_a_mesh(sources, orbax_dir):
    reference = from_pretrained(sources["legacy-fp32-single"])
    plain = from_pretrained(orbax_dir)
    want = jax.tree.map(np.asarray, nnx.state(reference, nnx.Param))
    for got_model in (plain, from_pretrained(orbax_dir, mesh=make_mesh("fsdp=2,expert=4"))):
        got = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.state(got_model, nnx.Param))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, got)
    sharded = from_pretrained(orbax_dir, mesh=make_mesh("fsdp=2,expert=4"))
    w1 = sharded.layers.block_sparse_moe.w1[...]
    assert tuple(w1.sharding.spec)[:3] == (None, "expert", "fsdp")
    assert len({s.device for s in w1.addressable_shards}) == 8
    np.testing.assert_array_equal(logits_of(plain), logits_of(reference))
    np.testing.assert_allclose(logits_of(sharded), logits_of(reference), atol=1e-5, rtol=0)


def _params(model) -> dict:
    return {name: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), v.get_value())
            for name, v in named_params(model)}


@pytest.mark.slow
def test_mesh_chunks_are_the_shards_and_change_no_value(sources, orbax_dir, tmp_path):
    """--mesh: every array in chunks of one device's shard on that mesh; restored onto it (and onto another)
    and converted back to HF, the values are those of the unchunked checkpoint."""
    from mixtral_jax.cli.main import main

    spec = "fsdp=2,expert=2,tensor=2"
    out = tmp_path / "chunked"
    assert main(["convert", "hf-to-orbax", sources["legacy-fp32-single"], str(out), "--mesh", spec, "--quiet"]) == 0
    mesh = make_mesh(spec)
    sharded = from_pretrained(str(out), mesh=mesh)
    for param, keys, stacked in [("layers.block_sparse_moe.w1", "layers.001.block_sparse_moe.w1.003", 2),
                                 ("layers.self_attn.q_proj", "layers.000.self_attn.q_proj", 1),
                                 ("embed_tokens", "embed_tokens", 0)]:
        with open(out / "weights" / "state" / keys / "zarr.json") as f:
            chunk = json.load(f)["chunk_grid"]["configuration"]["chunk_shape"]
        shard = dict(named_params(sharded))[param].get_value().addressable_shards[0].data.shape
        assert tuple(chunk) == shard[stacked:], param
    assert sum(len(files) for _, _, files in os.walk(out / "weights" / "state" / "embed_tokens" / "c")) == 4
    want = _params(from_pretrained(orbax_dir))
    for got in (_params(sharded), _params(from_pretrained(str(out), mesh=make_mesh("fsdp=4,expert=2")))):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    orbax_to_hf(str(out), str(tmp_path / "hf"), show_progress=False)  # read_into, chunk by chunk
    expected, written = read_dir(sources["legacy-fp32-single"]), read_dir(tmp_path / "hf")
    assert written.keys() == expected.keys()
    for key in expected:  # fp32: compared as bits
        assert torch.equal(written[key].view(torch.int32), expected[key].contiguous().view(torch.int32)), key


@pytest.mark.slow
def test_restore_casts_and_attaches_lora(orbax_dir):
    from mixtral_jax.model.lora import LoraConfig

    model = from_pretrained(orbax_dir, "bfloat16", lora=LoraConfig(rank=4, alpha=8.0))
    assert model.layers.self_attn.q_proj[...].dtype == jax.numpy.bfloat16
    assert model.layers.self_attn.q_proj_lora_a[...].shape[-1] == 4
    assert np.isfinite(np.asarray(logits_of(model), np.float32)).all()


@pytest.fixture(scope="module")
def wide_hf(tmp_path_factory):
    """A model wide enough that the packed NF4 bytes dominate the Orbax metadata on disk."""
    config = MixtralConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    out = str(tmp_path_factory.mktemp("wide") / "hf")
    save_pretrained(Mixtral(config, rngs=nnx.Rngs(3)), out)
    return out


def _disk_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def _assert_same_nf4_arrays(restored, expected, double_quant: bool) -> int:
    """Every parameter of `restored` is `expected`'s, an NF4 weight array for array; returns how many are NF4."""
    expected_params = dict(named_params(expected))
    quantized = 0
    for name, variable in named_params(restored):
        q, e = variable.get_value(), expected_params[name].get_value()
        assert isinstance(q, NF4Weight) == isinstance(e, NF4Weight), name
        if isinstance(q, NF4Weight):
            quantized += 1
            assert q.double_quant == e.double_quant == double_quant, name
            got, want = as_leaves(q), as_leaves(e)
            assert got.keys() == want.keys(), name
            for leaf in want:
                np.testing.assert_array_equal(np.asarray(got[leaf]), np.asarray(want[leaf]), err_msg=f"{name} {leaf}")
            assert (q.shape, q.dtype, q.axes, q.by_rows) == (e.shape, e.dtype, e.axes, e.by_rows), name
    return quantized


@pytest.mark.slow
def test_nf4_checkpoint_is_packed_and_equals_quantize_base(wide_hf, tmp_path):
    """--quantize nf4: double-quantised (bitsandbytes' compress_statistics), exactly quantize_base's arrays."""
    summary = convert_hf(wide_hf, tmp_path / "nf4", quantize="nf4")
    convert_hf(wide_hf, tmp_path / "full")
    bits = 8 * summary["quantized_bytes"] / summary["quantized_params"]
    assert bits == pytest.approx(4.13, abs=0.01)  # 4.127 and a little more per tensor at these small widths
    disk_nf4, disk_full = _disk_bytes(tmp_path / "nf4" / "weights"), _disk_bytes(tmp_path / "full" / "weights")
    # What the disk holds beyond the unquantised weights, per quantised parameter (fp32 would be 4.0).
    per_param = (disk_nf4 - summary["other_bytes"]) / summary["quantized_params"]
    print(f"NF4 checkpoint: {disk_nf4} bytes on disk (fp32: {disk_full}); {per_param:.3f} bytes per quantised "
          f"parameter including Orbax metadata")
    assert bits / 8 <= per_param < 0.6
    assert disk_full > 5 * disk_nf4  # Orbax's zstd takes ~7% off random fp32 weights; NF4 over 80%

    restored = from_pretrained(str(tmp_path / "nf4"))
    expected = quantize_base(from_pretrained(wide_hf))
    # the experts were quantised one expert at a time, each its own bitsandbytes tensor as in quantize_base
    assert _assert_same_nf4_arrays(restored, expected, double_quant=True) == 8
    assert summary["quantized_bytes"] == sum(v.get_value().nbytes for _, v in named_params(expected)
                                             if isinstance(v.get_value(), NF4Weight))
    ids = INPUT_IDS % 128
    np.testing.assert_array_equal(np.asarray(_logits(restored, ids)), np.asarray(_logits(expected, ids)))
    sharded = from_pretrained(str(tmp_path / "nf4"), mesh=make_mesh("fsdp=2,expert=4"))
    np.testing.assert_allclose(np.asarray(_logits(sharded, ids)), np.asarray(_logits(expected, ids)), atol=1e-5)
    convert_hf(wide_hf, tmp_path / "nf4-chunked", quantize="nf4", mesh="fsdp=2,expert=4")
    chunked = _params(from_pretrained(str(tmp_path / "nf4-chunked"), mesh=make_mesh("fsdp=2,expert=4")))
    for name, value in _params(sharded).items():  # the NF4 arrays in chunks of their shards: the same arrays
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, err_msg=name), chunked[name], value)


@pytest.mark.slow
def test_plain_nf4_and_version_2_nf4_checkpoints_load_as_plain_nf4(wide_hf, tmp_path):
    """--quantize nf4-plain stores fp32 block scales, as versions 1 and 2 stored every NF4 checkpoint (and
    called it "nf4"): such a checkpoint still loads, as plain NF4."""
    import shutil

    plain = tmp_path / "plain"
    summary = convert_hf(wide_hf, plain, quantize="nf4-plain")
    assert summary["quantized_bytes"] / summary["quantized_params"] == pytest.approx(0.5625)
    marker = json.load(open(plain / orbax_model.MARKER))
    assert marker["quantize"] == "nf4-plain" and marker["version"] == 3
    old = tmp_path / "v2"
    shutil.copytree(plain, old)
    json.dump({**marker, "version": 2, "quantize": "nf4"}, open(old / orbax_model.MARKER, "w"))
    assert orbax_model.read_marker(str(old))["quantize"] == "nf4-plain"
    expected = quantize_model(from_pretrained(wide_hf), "nf4-plain")
    for directory in (plain, old):
        assert _assert_same_nf4_arrays(from_pretrained(str(directory)), expected, double_quant=False) == 8
    w1 = expected.layers.block_sparse_moe.w1.get_value()
    np.testing.assert_array_equal(orbax_model.OrbaxSource(str(old)).read("layers.block_sparse_moe.w1", 1),
                                  np.asarray(dequantize_weight(w1))[1])


def test_markers_of_earlier_versions_read_nf4_as_plain(tmp_path):
    os.makedirs(tmp_path / "weights")
    marker = {"format": orbax_model.FORMAT, "dtype": "float32", "num_hidden_layers": 2, "weights": ["weights"]}
    for version, stored, read in [(1, "nf4", "nf4-plain"), (2, "nf4", "nf4-plain"), (2, "none", "none"),
                                  (3, "nf4", "nf4"), (3, "nf4-plain", "nf4-plain")]:
        json.dump({**marker, "version": version, "quantize": stored}, open(tmp_path / orbax_model.MARKER, "w"))
        assert orbax_model.read_marker(str(tmp_path))["quantize"] == read, (version, stored)


def test_linear_weights_read_in_row_blocks_are_unchanged(sources, monkeypatch):
    """HFSource reads a large linear weight a row block at a time; blocks that do not divide the rows too."""
    from mixtral_jax.checkpoints import sources as layer_tensors

    source = layer_tensors.HFSource(sources["legacy-bf16-sharded"])
    whole = {p: source.read(p, layer) for p, layer in [("lm_head", None), ("layers.self_attn.q_proj", 1)]}
    monkeypatch.setattr(layer_tensors, "_READ_BLOCK_BYTES", 3 * 32 * 2)  # 3 rows of a 32-wide bf16 weight
    for (param, layer), expected in zip([("lm_head", None), ("layers.self_attn.q_proj", 1)], whole.values()):
        got = source.read(param, layer)
        assert got.dtype == expected.dtype and np.array_equal(got.view(np.uint16), expected.view(np.uint16))
