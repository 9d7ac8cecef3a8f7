"""Our safetensors reader/writer: bit-exact round trips and interchange with the reference `safetensors` package."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.safetensors_files import SafetensorsFile, write_safetensors


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((5, 7)).astype(np.float32)
    f32[0, :4] = [np.inf, -np.inf, -0.0, np.float32(1e-42)]  # subnormal and signed zero survive bit for bit
    return {
        "fp32": f32,
        "bf16": rng.standard_normal((3, 4, 2)).astype(ml_dtypes.bfloat16),
        "fp16": rng.standard_normal((6,)).astype(np.float16),
        "int64": rng.integers(-2**62, 2**62, size=(4, 3), dtype=np.int64),
        "int32": rng.integers(-2**31, 2**31 - 1, size=(9,), dtype=np.int32),
        "uint8": rng.integers(0, 256, size=(2, 5), dtype=np.uint8),
        "int8": rng.integers(-128, 128, size=(3,), dtype=np.int8),
        "bool": rng.integers(0, 2, size=(4,)).astype(bool),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def assert_bit_equal(a: np.ndarray, b: np.ndarray):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def test_round_trip_bit_exact(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt", "note": "hello"})
    f = SafetensorsFile(path)
    assert f.keys() == list(tensors)  # written in the given order
    assert f.metadata == {"format": "pt", "note": "hello"}
    for name, array in tensors.items():
        assert f.shape(name) == array.shape
        assert f.dtype(name) == array.dtype
        assert_bit_equal(f.get(name), array)
    assert f.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)


def test_write_accepts_pairs_and_noncontiguous(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    pairs = [("t", base.T), ("s", base[:, ::2])]
    path = tmp_path / "t.safetensors"
    write_safetensors(path, pairs)
    f = SafetensorsFile(path)
    assert_bit_equal(f.get("t"), np.ascontiguousarray(base.T))
    assert_bit_equal(f.get("s"), np.ascontiguousarray(base[:, ::2]))
    assert f.metadata == {"format": "pt"}


def test_header_is_aligned_and_standard(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, sample_tensors())
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and (8 + n) % 4096 == 0  # the tensors start on a disk block (O_DIRECT writes them whole)
    header = json.loads(raw[8:8 + n])
    assert header["bf16"]["dtype"] == "BF16" and header["fp32"]["dtype"] == "F32"
    assert header["int64"]["dtype"] == "I64" and header["bool"]["dtype"] == "BOOL"
    assert len(raw) == 8 + n + max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")


def test_ours_read_by_safetensors_torch(tmp_path):
    tensors = {k: v for k, v in sample_tensors().items() if k not in ("empty",)}
    path = tmp_path / "ours.safetensors"
    write_safetensors(path, tensors)
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        t = loaded[name]
        assert tuple(t.shape) == array.shape
        if array.dtype == np.dtype(ml_dtypes.bfloat16):
            assert t.dtype == torch.bfloat16
            np.testing.assert_array_equal(t.float().numpy(), array.astype(np.float32))
        else:
            assert t.numpy().dtype == array.dtype
            assert_bit_equal(t.numpy(), array)


def test_safetensors_torch_read_by_ours(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "fp32": torch.randn(4, 5),
        "bf16": torch.randn(3, 2, 2).to(torch.bfloat16),
        "fp16": torch.randn(7).to(torch.float16),
        "int64": torch.randint(-2**40, 2**40, (3, 3), dtype=torch.int64),
        "int32": torch.randint(-1000, 1000, (5,), dtype=torch.int32),
        "uint8": torch.randint(0, 256, (2, 2), dtype=torch.uint8),
    }
    path = tmp_path / "torch.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    f = SafetensorsFile(path)
    assert set(f.keys()) == set(tensors)
    for name, t in tensors.items():
        got = f.get(name)
        assert got.shape == tuple(t.shape)
        if t.dtype == torch.bfloat16:
            assert got.dtype == np.dtype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())
            # bit for bit too: torch's bf16 bits viewed as int16
            assert got.view(np.int16).tobytes() == t.view(torch.int16).numpy().tobytes()
        else:
            assert_bit_equal(got, t.numpy())


def test_truncated_file_names_the_path(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, sample_tensors())
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    path.write_bytes(raw[:4])  # not even the header length
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)
    path.write_bytes(raw[:40])  # header cut short
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)


def test_corrupted_header_names_the_path(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.ones((2, 2), np.float32)})
    raw = bytearray(path.read_bytes())
    raw[8] = ord("#")  # the JSON's opening brace
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "header" in str(err.value)


def test_absurd_header_length_names_the_path(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": np.ones((2, 2), np.float32)})
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)


def test_malformed_entry_names_path_and_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    header = json.dumps({"weird": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "weird" in str(err.value)
    header = json.dumps({"odd": {"dtype": "F12", "shape": [3], "data_offsets": [0, 12]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and "odd" in str(err.value)


def test_missing_file_and_missing_tensor(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value)
    present = tmp_path / "t.safetensors"
    write_safetensors(present, {"a": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(present).get("b")
    assert str(present) in str(err.value) and "'b'" in str(err.value)
