"""Sources of layer-tensors: a model read as one of our parameters for one layer at a time (w1 of layer 7:
[E, D, F]; layer None for embed_tokens, norm, lm_head), whatever holds it: an HF directory of either expert
layout (`HFSource`), an Orbax model checkpoint (`orbax_format.OrbaxSource`) or a model in memory
(`ModelSource`). The converters and `verify` read through them, so the host holds one layer-tensor at a time,
or with `read_part(param, layer, (e,))` one expert's matrix (117 MB at 8x7B's widths against 940 MB).

`out`, where a reader takes it, is a buffer the caller reuses: filled where shape and dtype match (never a
cast), else a new page-aligned array, which O_DIRECT writes without a copy. HF files are read with plain
reads, not memory maps, whose touched pages would count as resident memory. No JAX at module level: the
converters start without it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

import numpy as np

from mixtral_jax.checkpoints.hf_files import CheckpointFiles, detect_mappings
from mixtral_jax.checkpoints.name_map import (
    Item,
    TensorMapping,
    layer_shapes,
    ordered_items,
    split_index,
)
from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError
from mixtral_jax.io.buffers import ThreadBuffer, transpose_into
from mixtral_jax.io.direct_files import aligned_empty

if TYPE_CHECKING:
    from mixtral_jax.model.transformer import Mixtral


_READ_BLOCK_BYTES = 32 << 20  # the largest piece of an HF linear weight read at once (one q_proj at 8x7B)


class HFSource:
    """An HF directory, legacy or fused layout, one file or sharded. `dtype` None: the checkpoint's own
    (that of model.embed_tokens.weight), as from_pretrained decides it."""

    def __init__(self, directory: str, dtype: str | None = None):
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: not a directory")
        MixtralConfig.from_hf(directory)  # a bad config.json is reported before any tensor is looked at
        self.directory = directory
        self.files = CheckpointFiles(directory)
        if dtype is None:
            key = "model.embed_tokens.weight"
            dtype = str(self.files.dtype(key)) if key in self.files.location else "float32"
        self.config = MixtralConfig.from_hf(directory, dtype=dtype, param_dtype=dtype)
        self.mappings = detect_mappings(self.files, self.config)
        self.groups: dict[Item, list[TensorMapping]] = {}
        for m in self.mappings:
            self.groups.setdefault((m.param, split_index(m)[0]), []).append(m)
        self.shapes = layer_shapes(self.config)
        self._counted: set[str] = set()
        self._blocks = ThreadBuffer()  # row blocks (fresh memory costs the kernel as much as the read)

    def items(self) -> list[Item]:
        return ordered_items(self.config)

    def total_bytes(self) -> int:
        keys = {m.hf_key for m in self.mappings}
        return sum(self.files.dtype(k).itemsize * int(np.prod(self.files.shape(k), dtype=np.int64)) for k in keys)

    def new_bytes(self, item: Item) -> int:
        """Bytes of the HF tensors `item` reads that no earlier item read (for a progress bar)."""
        total = 0
        for m in self.groups[item]:
            if m.hf_key not in self._counted:
                self._counted.add(m.hf_key)
                total += self.files.dtype(m.hf_key).itemsize * int(np.prod(self.files.shape(m.hf_key), dtype=np.int64))
        return total

    def read(self, param: str, layer: int | None, out: np.ndarray | None = None) -> np.ndarray:
        shape, dtype = self.shapes[param]
        buffer = reuse_or_new(out, shape, dtype)
        for m in self.groups[(param, layer)]:
            self._fill(m, buffer[split_index(m)[1]])
        return buffer

    def read_part(self, param: str, layer: int | None, inner: tuple, out: np.ndarray | None = None) -> np.ndarray:
        """`read(param, layer)[inner]`, reading only the bytes it needs (inner: an expert index, (e,))."""
        inner = tuple(inner)
        if not inner:
            return self.read(param, layer, out)
        shape, dtype = self.shapes[param]
        out = reuse_or_new(out, shape[len(inner):], dtype)
        for m in self.groups[(param, layer)]:
            index = split_index(m)[1]
            if m.kind.startswith("fused_") and len(inner) == 1:
                self._fill(m, out, expert=inner[0])
                return out
            if index == inner:
                self._fill(m, out)
                return out
        raise KeyError(f"{param} layer {layer}: no HF tensor holds index {inner}")

    def _fill(self, m: TensorMapping, target: np.ndarray, expert: int | None = None) -> None:
        """Our layout of mapping `m` into `target` (C-contiguous; with `expert`, only that expert of a fused
        tensor), read with plain file reads."""
        if m.kind == "copy" and target.flags.c_contiguous and target.dtype == self.files.dtype(m.hf_key):
            self.files.read_copy(m.hf_key, out=target.reshape(m.hf_shape))  # straight into place
        elif m.kind == "copy":
            target[...] = self.files.read_copy(m.hf_key).reshape(target.shape)
        elif m.kind == "linear":  # read in row blocks, so that a 262 MB LM head is not held twice
            rows, cols = m.hf_shape
            ours = target.reshape(cols, rows)
            dtype = self.files.dtype(m.hf_key)
            block = max(1, _READ_BLOCK_BYTES // (cols * dtype.itemsize))
            for start in range(0, rows, block):
                n = min(block, rows - start)
                raw = self.files.read_copy(m.hf_key, rows=slice(start, start + n),
                                           out=self._blocks.take((n, cols), dtype))
                transpose_into(raw, ours[:, start:start + n])
        else:  # fused_w1 / fused_w3: [E, 2F, D] halves; fused_w2: [E, D, F]; each expert transposed
            f = m.hf_shape[1] // 2
            rows = {"fused_w1": slice(0, f), "fused_w3": slice(f, 2 * f)}.get(m.kind)
            for e in range(m.hf_shape[0]) if expert is None else (expert,):
                raw = self.files.read_copy(m.hf_key, (e,), rows)
                transpose_into(raw, target[e] if expert is None else target)

    def extra_files(self) -> dict[str, str]:
        return extra_files(self.directory)


class ModelSource:
    """A model in memory (on any mesh): each read fetches one layer's slice of one parameter to the host; an
    NF4 weight is dequantised to its dtype. (The one source that needs JAX, imported here: a model in memory
    has it loaded already.)"""

    def __init__(self, model: Mixtral, directory: str | None = None):
        from mixtral_jax.checkpoints.placement import named_params

        self.model = model
        self.config = model.config
        self.params = dict(named_params(model))
        self.directory = directory

    def items(self) -> list[Item]:
        return ordered_items(self.config)

    def read(self, param: str, layer: int | None) -> np.ndarray:
        import jax

        from mixtral_jax.quantization.nf4_weight import NF4Weight, dequantize_weight

        value = self.params[param].get_value()
        if layer is not None:
            value = jax.tree.map(lambda a: a[layer], value)
        if isinstance(value, NF4Weight):
            value = dequantize_weight(value)
        return np.asarray(jax.device_get(value))

    def read_part(self, param: str, layer: int | None, inner: tuple, out: np.ndarray | None = None) -> np.ndarray:
        import jax

        from mixtral_jax.quantization.nf4_weight import NF4Weight

        value = self.params[param].get_value()
        if isinstance(value, NF4Weight) or not inner:
            return self.read(param, layer)[tuple(inner)]
        index = (layer, *inner) if layer is not None else tuple(inner)
        return np.asarray(jax.device_get(value[index]))

    def extra_files(self) -> dict[str, str]:
        return {} if self.directory is None else extra_files(self.directory)


# Files beside the weights that a published HF directory carries along.
EXTRA_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def extra_files(directory: str) -> dict[str, str]:
    return {name: os.path.join(directory, name) for name in EXTRA_FILES
            if os.path.isfile(os.path.join(directory, name))}


def reuse_or_new(out: np.ndarray | None, shape: tuple, dtype) -> np.ndarray:
    """`out` where it is a C-contiguous array of this shape and dtype, else a new (page-aligned) one."""
    if out is not None and out.shape == tuple(shape) and out.dtype == np.dtype(dtype) and out.flags.c_contiguous:
        return out
    return aligned_empty(shape, dtype)


def iter_read(source, items: list[Item] | None = None) -> Iterator[tuple[Item, np.ndarray]]:
    for item in items or source.items():
        yield item, source.read(*item)
