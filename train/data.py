"""A run's data: its sources (prepared stores or raw sources) as training rows (mixtral_jax/data/sequences.py),
and the shuffled, resumable, per-host batch iterator over them.

Data stays in numpy: it is read on the host, and each host hands only its own rows to the device mesh, split
over the mesh's batch axes (`batch_split` checks that a global batch divides evenly over them).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import grain
import numpy as np

from mixtral_jax.data import sft, store
from mixtral_jax.data.pretrain import pretrain_blocks
from mixtral_jax.data.sequences import (
    BlockRows,
    Blocks,
    Concatenated,
    Examples,
    PackedRows,
    PaddedRows,
    Repeated,
    Rows,
    replay_count,
)
from mixtral_jax.data.texts import DataError, read_texts
from mixtral_jax.data.tokenizer import identity
from mixtral_jax.errors import ConfigError
from mixtral_jax.parallel.distributed import host_rows
from mixtral_jax.parallel.sharding import default_rules


def batch_split(mesh_shape: Mapping[str, int], batch: int, micro_batches: int = 1, what: str = "batch_size",
                error: type[Exception] = ConfigError) -> int:
    """How many ways the mesh splits a batch: the product of the axes the sharding rules
    (presets/sharding_rules.yaml) give the logical axis `batch` (data x fsdp x expert). A batch, or a
    micro-batch of batch / micro_batches rows, that they do not divide raises `error`: the step would keep
    the whole batch on every device instead (the rules replicate a dimension an axis does not divide)."""
    axes = default_rules()["batch"]
    shards = math.prod(int(mesh_shape.get(axis, 1)) for axis in axes)
    over = f"{' x '.join(axes)} = {shards}, the axes the batch is split over"
    if batch % shards:
        raise error(f"{what} {batch} is not divisible by {over}")
    rows = batch // micro_batches
    if micro_batches > 1 and rows % shards:
        raise error(f"{what} {batch} as {micro_batches} micro-batches of {rows} rows: {rows} is not divisible by "
                    f"{over}")
    return shards


def load_rows(config, sources: Sequence[str], tokenizer, replay: bool = False) -> tuple[Rows, int]:
    """The training rows of `sources` and how many SFT samples were dropped. Prepared stores (a directory with
    a manifest, mixtral_jax/data/store.py) are memory-mapped after checking they fit the run; raw sources are
    tokenised here, in memory (small data, tests). With `replay`, pre-training blocks of `data.replay` make up
    `data.replay_share` of the result."""
    data = config.data
    prepared = [store.is_store(source) for source in sources]
    if any(prepared) and not all(prepared):
        raise DataError(f"{', '.join(sources)}: prepared stores and raw sources mixed; prepare them all "
                        "(mixtral-jax data prepare) or none")
    if all(prepared):
        rows, dropped = _store_rows(config, sources, tokenizer)
    elif data.kind == "pretrain":
        texts = (text for source in sources for text in read_texts(source, data.text_field))
        rows, dropped = BlockRows(Blocks([pretrain_blocks(texts, tokenizer, data.seq_len, data.group_lines)],
                                         data.seq_len)), 0
    else:
        records = [record for source in sources for record in sft.read_alpaca(source)]
        pairs, dropped = sft.build_sft(records, tokenizer, data.seq_len)
        rows = _example_rows(config, Examples.from_pairs(pairs), tokenizer)
    if replay and data.kind == "pretrain" and data.replay and data.replay_share:
        count = replay_count(len(rows), data.replay_share)
        rows = Concatenated([rows, Repeated(load_rows(config, data.replay, tokenizer)[0], count)])
    return rows, dropped


def _example_rows(config, examples: Examples, tokenizer) -> Rows:
    arrange = PackedRows if config.data.packing else PaddedRows
    return arrange(examples, config.data.seq_len, tokenizer.eos_id)


def _store_rows(config, sources: Sequence[str], tokenizer) -> tuple[Rows, int]:
    parts, dropped = [], 0
    for source in sources:
        manifest, sequences = store.open_store(source)
        store.check_fits(source, manifest, config.data.kind, config.data.seq_len, identity(tokenizer))
        dropped += manifest["counts"].get("dropped", 0)
        parts.append(BlockRows(sequences) if manifest["kind"] == "pretrain"
                     else _example_rows(config, sequences, tokenizer))
    return (parts[0] if len(parts) == 1 else Concatenated(parts)), dropped


class BatchIterator:
    """Endless global batches of `global_batch` rows, reshuffled each epoch; each host reads only its rows.

    The order is Grain's: `MapDataset.source(rows).shuffle(seed)`, whose epoch e is a permutation seeded by
    seed + e (an index shuffle: no permutation array, whatever the number of rows). It depends on nothing but
    the seed, which is what lets `restore` resume exactly from (epoch, position). The last incomplete global
    batch of an epoch is dropped. Each host gets only its rows of each global batch
    (`mixtral_jax.parallel.distributed.host_rows`), read from the rows (a memory map) when asked for.
    `sources` (the files or names the rows were read from) name them in an error.
    """

    def __init__(self, rows: Rows, global_batch: int, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, sources: Sequence[str] = ()):
        self.rows = len(rows)
        self.global_batch = global_batch
        self.host_slice = host_rows(global_batch, process_index, process_count)
        if self.steps_per_epoch == 0:
            named = f"{', '.join(sources)}: " if sources else ""
            raise DataError(f"{named}{self.rows} examples are fewer than one global batch of {global_batch}")
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._source = grain.MapDataset.source(rows)
        self._dataset = self._source.shuffle(seed=self.seed)

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        first = self.epoch * self.rows + self.position * self.global_batch
        indices = np.arange(first, first + self.global_batch)[self.host_slice]
        self.position += 1
        chosen = [self._dataset[int(index)] for index in indices]
        return {key: np.stack([row[key] for row in chosen]) for key in chosen[0]}

    def state(self) -> dict[str, int]:
        """Plain ints, for a checkpoint's metadata."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: Mapping[str, int]) -> None:
        epoch, position, seed = (int(state[key]) for key in ("epoch", "position", "seed"))
        if not 0 <= position <= self.steps_per_epoch or epoch < 0:
            raise DataError(f"data state {dict(state)} does not fit {self.steps_per_epoch} steps per epoch")
        self.epoch, self.position = epoch, position
        if seed != self.seed:
            self.seed, self._dataset = seed, self._source.shuffle(seed=seed)
