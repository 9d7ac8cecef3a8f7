"""`convert hf-to-orbax`, `convert orbax-to-hf` and `convert verify`: the command line's arguments for the
library's streaming converters (mixtral_jax/checkpoints/hf_to_orbax.py, orbax_to_hf.py), and a
tensor-by-tensor comparison of any two checkpoints."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mixtral_jax.checkpoints.hf_to_orbax import convert_hf
from mixtral_jax.checkpoints.name_map import (
    legacy_mappings,
    ours_to_hf_into,
    split_index,
)
from mixtral_jax.checkpoints.open_source import open_source
from mixtral_jax.checkpoints.orbax_to_hf import orbax_to_hf as write_hf
from mixtral_jax.checkpoints.sources import HFSource
from mixtral_jax.config import canonical_dtype
from mixtral_jax.errors import CheckpointError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _dtype(dtype: Any, function: str) -> str | None:
    """None for "keep" (or None): the source's dtype; else the canonical name of any spelling ("bf16",
    jnp.bfloat16, ...)."""
    if dtype is None or (isinstance(dtype, str) and dtype == "keep"):
        return None
    return canonical_dtype(dtype, f"{function}: argument 'dtype'")


def hf_to_orbax(hf_dir: str, out: str, dtype: Any = "keep", quantize: str = "none", mesh: str | None = None,
                overwrite: bool = False, show_progress: bool = True) -> dict:
    """`convert hf-to-orbax`'s arguments as the command line gives them (dtype "keep")."""
    return convert_hf(hf_dir, out, dtype=_dtype(dtype, "hf_to_orbax"), quantize=quantize, mesh=mesh,
                      overwrite=overwrite, show_progress=show_progress)


def orbax_to_hf(src: str, out: str, dtype: Any = "keep", max_shard_size: str | int | None = "5GB", **options) -> None:
    """`convert orbax-to-hf`'s arguments as the command line gives them (dtype "keep", sizes as text)."""
    dtype = _dtype(dtype, "orbax_to_hf")
    max_bytes = None if max_shard_size in (None, "", 0) else (
        max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size))
    write_hf(src, out, dtype=dtype, max_shard_bytes=max_bytes, **options)


def parse_size(text: str) -> int:
    """'5GB' (as transformers counts: 10^9), '500MiB', '20000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"--max-shard-size '{text}': expected a size such as 5GB, 500MB or 20000")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


# ------------------------------------------------------------------------------------------------ verify
def _architecture(config) -> dict:
    hf = config.to_hf()
    hf.pop("torch_dtype", None)
    hf.pop("dtype", None)
    return hf


def compare(a: str, b: str) -> list[dict]:
    """Every tensor of two checkpoints (HF dir of either layout, Orbax model dir, training run) in HF legacy
    naming: [{"tensor", "shape", "max_abs_diff"}], read one HF tensor at a time from each (an expert's matrix,
    not the whole layer-tensor) and compared in chunks."""
    sa, sb = open_source(a), open_source(b)
    ca, cb = _architecture(sa.config), _architecture(sb.config)
    for key in sorted(set(ca) | set(cb)):
        if ca.get(key) != cb.get(key):
            raise CheckpointError(f"{a} and {b} differ in config field '{key}' ({ca.get(key)!r} vs "
                                  f"{cb.get(key)!r}); their tensors cannot be compared")
    rows = []
    for m in legacy_mappings(sa.config):
        rows.append({"tensor": m.hf_key, "shape": list(m.hf_shape),
                     "max_abs_diff": _max_diff(_hf_tensor(sa, m), _hf_tensor(sb, m))})
    return rows


def _hf_tensor(source, m) -> np.ndarray:
    """One HF tensor of a source (in HF legacy layout), read alone: an HF directory in the legacy layout
    gives its bytes as stored; other sources one layer-tensor or one expert's matrix, transposed."""
    if isinstance(source, HFSource) and m.hf_key in source.files.location and source.files.shape(m.hf_key) == \
            tuple(m.hf_shape):
        raw = source.files.read_copy(m.hf_key)
        if raw.dtype == np.dtype(source.config.param_dtype):
            return raw
    layer, inner = split_index(m)
    ours = source.read_part(m.param, layer, inner) if inner else source.read(m.param, layer)
    return ours_to_hf_into(m, np.asarray(ours), np.empty(m.hf_shape, ours.dtype))


_CHUNK = 16 << 20  # bytes of each tensor compared at a time


def _max_diff(x: np.ndarray, y: np.ndarray) -> float:
    """max |x - y| (0 where bit-identical, inf where NaNs differ in place), chunk by chunk, so the float64
    copies are of one chunk, never of the whole tensor."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.shape != y.shape:
        return float("inf")
    step = max(_CHUNK // max(x.itemsize, y.itemsize, 1), 1)
    worst = 0.0
    for i in range(0, x.size, step):
        a, b = x[i:i + step], y[i:i + step]
        if a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)):
            continue
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if np.array_equal(a64, b64, equal_nan=True):
            continue
        if not np.array_equal(np.isnan(a64), np.isnan(b64)):
            return float("inf")
        worst = max(worst, float(np.nanmax(np.abs(a64 - b64))))
    return worst


def verify(a: str, b: str, atol: float = 0.0, top: int = 10, as_json: bool = False, out=print) -> int:
    import json

    rows = compare(a, b)
    worst = sorted(rows, key=lambda r: -r["max_abs_diff"])
    overall = worst[0]["max_abs_diff"] if worst else 0.0
    differ = [r for r in rows if r["max_abs_diff"] > 0]
    ok = overall <= atol
    if as_json:
        out(json.dumps({"a": a, "b": b, "tensors": len(rows), "differing": len(differ), "max_abs_diff": overall,
                        "atol": atol, "ok": ok, "largest": worst[:top]}, indent=2))
    else:
        width = max([len(r["tensor"]) for r in worst[:top]] + [6])
        out(f"{'tensor':<{width}}  {'shape':<18}  max |a - b|")
        for r in worst[:top]:
            out(f"{r['tensor']:<{width}}  {str(r['shape']):<18}  {r['max_abs_diff']:.6g}")
        out(f"overall: max |a - b| = {overall:.6g} over {len(rows)} tensors, {len(differ)} differ; "
            f"{'identical' if overall == 0 else 'within' if ok else 'beyond'}"
            f"{'' if overall == 0 else f' --atol {atol:g}'}")
    return 0 if ok else 1


__all__ = ["compare", "hf_to_orbax", "orbax_to_hf", "parse_size", "verify"]
