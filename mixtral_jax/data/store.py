"""Prepared data stores: token sequences tokenised once (`mixtral-jax data prepare`, mixtral_jax/data/prepare.py)
and memory-mapped by every host at every start, so a restart costs seconds instead of re-tokenising a corpus.

A store is a directory: `manifest.json` (what it holds and how it was made: kind, tokenizer identity, seq_len,
the rules, the sources with their sizes, the counts, the shards with their byte sizes) and raw little-endian
arrays per shard, read with `np.memmap` without parsing:

* pretrain: `shard-NNNNN.blocks.bin` int32 [rows, seq_len];
* sft: `shard-NNNNN.tokens.bin` int32 (the examples end to end), `.offsets.bin` int64 [rows + 1] and
  `.prompts.bin` int32 [rows] (the prompt length, whose labels are -100): unpadded, padded or packed per batch.

The manifest is written last, so a directory without one is not a store (an interrupted prepare). A store
that does not fit a run (another tokenizer, seq_len or kind, a missing or truncated shard, a newer format) is
refused with one error naming the store and the field, before anything is compiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, BinaryIO

import numpy as np

from mixtral_jax.data.sequences import Blocks, Examples
from mixtral_jax.data.texts import DataError
from mixtral_jax.io import paths
from mixtral_jax.io.output_dir import write_json

MANIFEST = "manifest.json"
FORMAT = "mixtral-jax prepared data"
VERSION = 1
KINDS = ("pretrain", "sft")
ARRAYS = {"pretrain": {"blocks": np.int32}, "sft": {"tokens": np.int32, "offsets": np.int64, "prompts": np.int32}}
DEFAULT_SHARD_ROWS = 1 << 20  # 4 GiB of 1,024-token blocks: few files, each one copy job


def shard_file(shard: int, array: str) -> str:
    return f"shard-{shard:05d}.{array}.bin"


def is_store(path: str) -> bool:
    """A directory (local or gs://) holding a prepared store's manifest."""
    try:
        return (paths.as_path(path) / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


class StoreWriter:
    """Appends sequences in order into shards of `shard_rows` rows in `directory` (local); `finish` writes the
    manifest. Nothing here is complete before the manifest exists."""

    def __init__(self, directory: str, kind: str, seq_len: int, shard_rows: int = DEFAULT_SHARD_ROWS):
        if kind not in KINDS:
            raise DataError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
        self.directory, self.kind, self.seq_len, self.shard_rows = directory, kind, seq_len, shard_rows
        self.shards: list[dict] = []
        self.files: dict[str, BinaryIO] = {}
        self.rows = self.tokens = self.shard_tokens = 0

    def _room(self) -> int:
        """Rows the current shard still takes, opening the next shard when it is full."""
        if not self.shards or self.shards[-1]["rows"] == self.shard_rows:
            self._close_files()
            self.shards.append({"rows": 0})
            shard = len(self.shards) - 1
            self.files = {name: open(os.path.join(self.directory, shard_file(shard, name)), "wb")
                          for name in ARRAYS[self.kind]}
            if self.kind == "sft":
                self.shard_tokens = 0
                self.files["offsets"].write(np.zeros(1, np.int64).tobytes())
        return self.shard_rows - self.shards[-1]["rows"]

    def add_blocks(self, blocks: np.ndarray) -> None:
        """int32 [n, seq_len] pre-training blocks."""
        while len(blocks):
            take = min(self._room(), len(blocks))
            self.files["blocks"].write(np.ascontiguousarray(blocks[:take], np.int32).tobytes())
            self._count(take, take * self.seq_len)
            blocks = blocks[take:]

    def add_block_file(self, path: str, rows: int) -> None:
        """Blocks a worker wrote to `path` (raw int32 [rows, seq_len]), moved into the shards by the kernel
        (copy_file_range: this process never reads them; sending them back through a pipe cost data prepare a
        fifth of its throughput) and deleted."""
        row_bytes = self.seq_len * np.dtype(np.int32).itemsize
        with open(path, "rb") as source:
            done = 0
            while done < rows:
                take = min(self._room(), rows - done)
                _copy_range(source, self.files["blocks"], done * row_bytes, take * row_bytes)
                self._count(take, take * self.seq_len)
                done += take
        os.unlink(path)

    def add_examples(self, examples: Examples) -> None:
        """SFT examples (one in-memory shard, as `Examples.from_pairs` makes them)."""
        (arrays,) = examples.shards
        lengths, done = np.diff(arrays["offsets"]), 0
        while done < len(lengths):
            take = min(self._room(), len(lengths) - done)
            start, end = arrays["offsets"][done], arrays["offsets"][done + take]
            self.files["tokens"].write(np.asarray(arrays["tokens"][start:end], np.int32).tobytes())
            ends = self.shard_tokens + np.cumsum(lengths[done:done + take])
            self.files["offsets"].write(ends.astype(np.int64).tobytes())
            self.files["prompts"].write(np.asarray(arrays["prompts"][done:done + take], np.int32).tobytes())
            self.shard_tokens = int(ends[-1])
            self._count(take, int(end - start))
            done += take

    def _count(self, rows: int, tokens: int) -> None:
        self.shards[-1]["rows"] += rows
        self.rows += rows
        self.tokens += tokens

    def _close_files(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files = {}

    def finish(self, **fields: Any) -> dict:
        """Closes the shards and writes the manifest (`fields`: tokenizer, rules, sources, counts)."""
        self._close_files()
        for index, shard in enumerate(self.shards):
            shard["files"] = {name: os.path.getsize(os.path.join(self.directory, shard_file(index, name)))
                              for name in ARRAYS[self.kind]}
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "seq_len": self.seq_len,
                    **fields, "counts": {"sequences": self.rows, "tokens": self.tokens, **fields.get("counts", {})},
                    "shard_rows": self.shard_rows, "shards": self.shards}
        write_json(os.path.join(self.directory, MANIFEST), manifest)
        return manifest


def _copy_range(source: BinaryIO, target: BinaryIO, offset: int, count: int) -> None:
    """`count` bytes of `source` from `offset` appended to `target`, in the kernel where it can."""
    target.flush()
    while count:
        try:
            copied = os.copy_file_range(source.fileno(), target.fileno(), count, offset)
        except OSError:  # another file system or an older kernel: through this process
            source.seek(offset)
            copied = target.write(source.read(min(count, 1 << 26)))
            target.flush()
        if copied == 0:
            raise DataError(f"{source.name}: ended {count:,} bytes early")
        offset, count = offset + copied, count - copied


def read_manifest(path: str) -> dict:
    where = f"{path}/{MANIFEST}"
    try:
        manifest = json.loads(paths.as_path(where).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not a prepared data store (no {MANIFEST}; an interrupted prepare leaves none)") \
            from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: not JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: field 'format' is not {FORMAT!r}")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise DataError(f"{where}: field 'version' is {manifest.get('version')!r}, made by a newer mixtral-jax "
                        f"(this one reads version {VERSION}); upgrade it or prepare the data again")
    if manifest.get("kind") not in KINDS:
        raise DataError(f"{where}: field 'kind' is {manifest.get('kind')!r}, expected one of {', '.join(KINDS)}")
    return manifest


def _shard_arrays(path: str, manifest: dict, index: int, shard: dict) -> dict[str, np.ndarray]:
    """The shard's arrays memory-mapped, each file's size checked against the manifest first."""
    rows, seq_len = shard["rows"], manifest["seq_len"]
    arrays = {}
    for name, dtype in ARRAYS[manifest["kind"]].items():
        file = os.path.join(path, shard_file(index, name))
        expected = shard["files"][name]
        try:
            size = os.path.getsize(file)
        except FileNotFoundError:
            raise DataError(f"{file}: missing (shard {index} of {path}/{MANIFEST})") from None
        if size != expected:
            raise DataError(f"{file}: {size:,} bytes, but {path}/{MANIFEST} field 'shards[{index}].files.{name}' "
                            f"says {expected:,} (truncated or replaced)")
        if size:
            arrays[name] = np.memmap(file, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
        else:
            arrays[name] = np.zeros(0, dtype)
    if manifest["kind"] == "pretrain":
        arrays["blocks"] = arrays["blocks"].reshape(rows, seq_len)
    return arrays


def open_store(path: str, cache_dir: str | None = None) -> tuple[dict, Blocks | Examples]:
    """(manifest, sequences) of a store; a gs:// store is first copied to a local cache (`local_copy`)."""
    manifest = read_manifest(path)
    local = local_copy(path, manifest, cache_dir) if paths.is_remote(path) else path
    shards = [_shard_arrays(local, manifest, index, shard) for index, shard in enumerate(manifest["shards"])]
    if manifest["kind"] == "pretrain":
        return manifest, Blocks([s["blocks"] for s in shards], manifest["seq_len"], manifest["shard_rows"])
    return manifest, Examples(shards, manifest["shard_rows"])


def check_fits(path: str, manifest: dict, kind: str, seq_len: int, tokenizer: dict) -> None:
    """One DataError naming the store and the field when the store was made for another run."""
    where = f"{path}/{MANIFEST}"
    if manifest["kind"] != kind:
        raise DataError(f"{where}: field 'kind' is {manifest['kind']!r}, but the run's data.kind is {kind!r}")
    if manifest["seq_len"] != seq_len:
        raise DataError(f"{where}: field 'seq_len' is {manifest['seq_len']}, but the run's data.seq_len is "
                        f"{seq_len}; prepare the data again with --seq-len {seq_len}")
    for key in ("vocab_size", "sha256", "bos_id", "eos_id"):
        if manifest.get("tokenizer", {}).get(key) != tokenizer[key]:
            raise DataError(f"{where}: field 'tokenizer.{key}' is {manifest.get('tokenizer', {}).get(key)!r}, but "
                            f"the run's tokenizer has {tokenizer[key]!r}: the store was tokenised by another "
                            "tokenizer; prepare it again with the run's")


def default_cache_dir() -> str:
    return os.environ.get("MIXTRAL_JAX_DATA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mixtral-jax",
                                                                 "data"))


def local_copy(path: str, manifest: dict, cache_dir: str | None = None) -> str:
    """A local copy of a gs:// store (each host reads its own copy by memory map): reused when its manifest is
    the same, else copied again, the manifest last."""
    key = hashlib.sha256(f"{path}\n{json.dumps(manifest, sort_keys=True)}".encode()).hexdigest()[:16]
    local = os.path.join(cache_dir or default_cache_dir(), key)
    if os.path.isfile(os.path.join(local, MANIFEST)):
        return local
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    source = paths.as_path(path)
    for index in range(len(manifest["shards"])):
        for name in ARRAYS[manifest["kind"]]:
            file = shard_file(index, name)
            try:
                (source / file).copy(os.path.join(local, file))
            except FileNotFoundError:
                raise DataError(f"{path}/{file}: missing (shard {index} of {path}/{MANIFEST})") from None
    write_json(os.path.join(local, MANIFEST), manifest)
    return local
