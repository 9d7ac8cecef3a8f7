"""orbax_files: the checkpoint we write leaf by leaf is, file for file, the one Orbax's own `ocp.save` writes
(without OCDBT and compression), and Orbax restores it, onto a mesh too."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from mixtral_jax.checkpoints.orbax_files import PyTreeWriter, crc32c, read_into
from mixtral_jax.checkpoints.orbax_keys import flatten
from mixtral_jax.parallel.sharding import make_mesh

ocp = pytest.importorskip("orbax.checkpoint.experimental.v1")


def _tree() -> dict:
    rng = np.random.default_rng(0)
    return {"embed_tokens": rng.standard_normal((1000, 37)).astype(ml_dtypes.bfloat16),  # > 1 block, unaligned
            "layers": {"000": {"w1": {"003": rng.standard_normal((16, 8, 64)).astype(np.float32)},  # 32 KB
                               "norm": np.ones(5, np.float32)}},
            "packed": rng.integers(0, 256, (64, 10), dtype=np.uint8),
            "zeros": np.zeros((7, 3), np.float32)}


def _written(directory, tree: dict, leaves=None) -> str:
    """`tree` written with PyTreeWriter (its leaves in the order given)."""
    writer = PyTreeWriter(directory)
    for keys, leaf in leaves or flatten(tree).items():
        writer.write(keys, leaf)
    writer.finalize()
    return str(directory)


def _files(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value


def test_files_equal_orbax_save_pytree(tmp_path):
    tree = _tree()
    ctx = ocp.Context()
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = False
    with ctx:
        ocp.save(tmp_path / "orbax", tree)
    _written(tmp_path / "ours", tree, reversed(list(flatten(tree).items())))  # any order
    theirs, ours = _files(tmp_path / "orbax"), _files(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    assert "state/layers.000.w1.003/c/0/0/0" in ours and "state/norm" not in ours
    for name in ours:
        if name == "_CHECKPOINT_METADATA":  # timestamps differ
            mine, orbax = json.loads(ours[name]), json.loads(theirs[name])
            assert mine.keys() == orbax.keys() and mine["item_handlers"] == orbax["item_handlers"]
        elif name != "commit_success.txt":  # names the directory
            assert ours[name] == theirs[name], name


def test_orbax_restores_it_onto_a_mesh(tmp_path):
    tree = _tree()
    _written(tmp_path / "ours", tree)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), tree, ocp.load(tmp_path / "ours"))
    mesh = make_mesh("fsdp=2,expert=4")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert", "fsdp"))
    abstract = {"layers": {"000": {"w1": {"003": jax.ShapeDtypeStruct((16, 8, 64), np.float32, sharding=sharding)}}}}
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        w1 = ocp.load(tmp_path / "ours", abstract)["layers"]["000"]["w1"]["003"]
    assert len(w1.addressable_shards) == 8 and w1.addressable_shards[0].data.shape == (4, 4, 64)
    np.testing.assert_array_equal(np.asarray(w1), tree["layers"]["000"]["w1"]["003"])


def test_a_key_written_twice_is_refused(tmp_path):
    writer = PyTreeWriter(tmp_path / "ours")
    writer.write(("a",), np.zeros(3, np.float32))
    with pytest.raises(FileExistsError):
        writer.write(("a",), np.zeros(3, np.float32))


def test_read_into_reads_our_files_and_declines_any_other_layout(tmp_path):
    tree = _tree()
    _written(tmp_path / "ours", tree)
    for keys, leaf in flatten(tree).items():
        out = np.empty_like(leaf)
        assert read_into(tmp_path / "ours", keys, out)
        assert np.array_equal(out.view(np.uint8), leaf.view(np.uint8)), keys
    assert not read_into(tmp_path / "ours", ("packed",), np.empty((64, 10), np.int8))  # another dtype
    assert not read_into(tmp_path / "ours", ("packed",), np.empty((10, 64), np.uint8))  # another shape
    assert not read_into(tmp_path / "ours", ("absent",), np.empty((3,), np.uint8))
    ocp.save(tmp_path / "ocdbt", tree)  # Orbax's default: OCDBT (and zstd)
    assert not read_into(tmp_path / "ocdbt", ("packed",), np.empty((64, 10), np.uint8))
    shard = tmp_path / "ours" / "state" / "packed" / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1  # the shard index's checksum
    shard.write_bytes(bytes(raw))
    assert not read_into(tmp_path / "ours", ("packed",), np.empty((64, 10), np.uint8))


def test_chunks_equal_orbaxs_files_for_arrays_sharded_on_a_mesh(tmp_path):
    """Chunks the size of a device's shard: the zarr.json and chunk files Orbax writes for an array sharded that
    way, one replica writing each shard (its other files describe jax.Arrays, ours numpy arrays); read_into
    and Orbax read them back."""
    from jax.sharding import NamedSharding, PartitionSpec

    rng = np.random.default_rng(1)
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    leaves = {("q",): (rng.standard_normal((16, 4, 8)).astype(ml_dtypes.bfloat16), ("fsdp", "tensor", None)),
              ("w",): (rng.standard_normal((12, 32)).astype(np.float32), (None, ("expert", "tensor"))),
              ("rows",): (rng.integers(0, 256, (8, 6), dtype=np.uint8), ("fsdp", None))}
    sharded = {keys[0]: jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(*spec)))
               for keys, (leaf, spec) in leaves.items()}
    ctx = ocp.Context()
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = False
    ctx.array.saving.use_replica_parallel = False  # else each replica writes a slice: smaller chunks
    with ctx:
        ocp.save(tmp_path / "orbax", sharded)
    writer = PyTreeWriter(tmp_path / "ours")
    for keys, (leaf, _) in leaves.items():
        writer.write(keys, leaf, sharded[keys[0]].addressable_shards[0].data.shape)
    writer.finalize()
    arrays = ("state/q/", "state/w/", "state/rows/")
    theirs = {n: b for n, b in _files(tmp_path / "orbax").items() if n.startswith(arrays)}
    ours = {n: b for n, b in _files(tmp_path / "ours").items() if n.startswith(arrays)}
    assert sorted(ours) == sorted(theirs) and "state/w/c/0/3" in ours and len(ours) == (4 + 1) + (4 + 1) + (2 + 1)
    for name in ours:
        assert ours[name] == theirs[name], name
    restored = ocp.load(tmp_path / "ours")
    for keys, (leaf, _) in leaves.items():
        out = np.empty_like(leaf)
        assert read_into(tmp_path / "ours", keys, out)
        assert np.array_equal(out.view(np.uint8), leaf.view(np.uint8)), keys
        np.testing.assert_array_equal(restored[keys[0]], leaf)
    with pytest.raises(ValueError, match="does not divide"):
        writer.write(("odd",), np.zeros((6, 4), np.float32), (4, 4))
