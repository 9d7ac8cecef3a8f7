"""Token sequences as the trainer reads them, one row at a time, whether they sit in memory (raw sources
tokenised at start) or memory-mapped from a prepared store's shards (mixtral_jax/data/store.py): nothing here
copies a whole corpus, so start-up time and host memory do not grow with it.

Two kinds of sequences: pre-training blocks (int32 [N, seq_len]) and SFT examples kept unpadded (their token
ids and where their labels start); and the training rows made of them: a block as inputs and labels, an
example padded to the row length, or consecutive examples packed into one row.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

from mixtral_jax.data.texts import DataError

IGNORE = -100  # the label of a position the loss skips (transformers' ignore_index)
Row = dict[str, np.ndarray]
Example = tuple[list[int], list[int]]  # (input_ids, labels), as build_dataset.py makes them


class Rows(Protocol):
    """What a batch is drawn from: equal-length training rows ({input_ids, labels, attention_mask})."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Row: ...


def _shard_of(index: int, count: int, shard_rows: int) -> tuple[int, int]:
    if not 0 <= index < count:
        raise IndexError(f"row {index} of {count}")
    return divmod(index, shard_rows)


class Blocks:
    """Pre-training blocks, int32 [n, seq_len] per shard; every shard but the last holds `shard_rows` rows."""

    def __init__(self, shards: Sequence[np.ndarray], seq_len: int, shard_rows: int | None = None):
        self.shards, self.seq_len = list(shards), seq_len
        self.count = sum(len(shard) for shard in self.shards)
        self.shard_rows = shard_rows or max(self.count, 1)

    def __len__(self) -> int:
        return self.count

    def block(self, index: int) -> np.ndarray:
        shard, row = _shard_of(index, self.count, self.shard_rows)
        return np.asarray(self.shards[shard][row], np.int32)


class Examples:
    """SFT examples, unpadded. Per shard: `tokens` int32 (the examples' ids end to end), `offsets` int64
    [n + 1] (example i is tokens[offsets[i]:offsets[i + 1]]) and `prompts` int32 [n] (how many leading
    tokens are the prompt, whose labels are -100); every shard but the last holds `shard_rows` examples."""

    def __init__(self, shards: Sequence[Mapping[str, np.ndarray]], shard_rows: int | None = None):
        self.shards = [dict(shard) for shard in shards]
        self.count = sum(len(shard["prompts"]) for shard in self.shards)
        self.shard_rows = shard_rows or max(self.count, 1)

    @classmethod
    def from_pairs(cls, examples: Sequence[Example]) -> Examples:
        """From build_dataset.py's (input_ids, labels) pairs, whose labels are -100 over the prompt, then the ids."""
        lengths = np.asarray([len(ids) for ids, _ in examples], np.int64)
        tokens = np.fromiter((t for ids, _ in examples for t in ids), np.int32, count=int(lengths.sum()))
        prompts = np.asarray([labels.count(IGNORE) for _, labels in examples], np.int32)
        return cls([{"tokens": tokens, "offsets": np.concatenate([[0], np.cumsum(lengths)]), "prompts": prompts}])

    def __len__(self) -> int:
        return self.count

    def example(self, index: int) -> tuple[np.ndarray, int]:
        """(input ids, prompt length) of example `index`."""
        shard, row = _shard_of(index, self.count, self.shard_rows)
        arrays = self.shards[shard]
        start, end = arrays["offsets"][row], arrays["offsets"][row + 1]
        return np.asarray(arrays["tokens"][start:end], np.int32), int(arrays["prompts"][row])

    def lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(shard["offsets"]) for shard in self.shards]) if self.shards else np.zeros(0)


class BlockRows:
    """A block is its own labels (the loss shifts them) and every token is attended to."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> Row:
        block = self.blocks.block(index)
        return {"input_ids": block, "labels": block.copy(), "attention_mask": np.ones_like(block)}


def _empty_row(length: int, pad_id: int) -> Row:
    return {"input_ids": np.full(length, pad_id, np.int32), "labels": np.full(length, IGNORE, np.int32),
            "attention_mask": np.zeros(length, np.int32)}


def _place(row: Row, start: int, ids: np.ndarray, prompt: int, segment: int) -> int:
    end = start + len(ids)
    row["input_ids"][start:end] = ids
    row["labels"][start + prompt:end] = ids[prompt:]
    row["attention_mask"][start:end] = segment
    return end


def _check_lengths(examples: Examples, length: int) -> None:
    longest = int(examples.lengths().max(initial=0))
    if longest > length:
        raise DataError(f"an example has {longest} tokens, more than the row length {length}")


class PaddedRows:
    """One example a row, padded on the right (input pad_id, the EOS in their recipe; labels -100; mask 0)."""

    def __init__(self, examples: Examples, length: int, pad_id: int):
        _check_lengths(examples, length)
        self.examples, self.length, self.pad_id = examples, length, pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Row:
        row = _empty_row(self.length, self.pad_id)
        _place(row, 0, *self.examples.example(index), segment=1)
        return row


def pack_starts(lengths: np.ndarray, length: int) -> np.ndarray:
    """int64 [rows + 1]: the first example of each packed row (and the end). Consecutive examples share a row
    while they fit, in order, none split; a new row starts when the next one does not."""
    starts, used = [], length
    for index, size in enumerate(lengths.tolist()):
        if used + size > length:
            starts.append(index)
            used = 0
        used += size
    return np.asarray([*starts, len(lengths)], np.int64)


class PackedRows:
    """Consecutive examples share a row (`pack_starts`). attention_mask holds segment ids 1, 2, 3, ... per
    example and 0 on padding: the model keeps attention within a segment and restarts positions there. Each
    segment's first label is -100 (its BOS is in the prompt), so the shifted loss never predicts one example
    from another."""

    def __init__(self, examples: Examples, length: int, pad_id: int):
        _check_lengths(examples, length)
        self.examples, self.length, self.pad_id = examples, length, pad_id
        self.starts = pack_starts(examples.lengths(), length)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index: int) -> Row:
        row, start = _empty_row(self.length, self.pad_id), 0
        for segment, example in enumerate(range(self.starts[index], self.starts[index + 1]), 1):
            start = _place(row, start, *self.examples.example(example), segment=segment)
        return row


class Concatenated:
    """Several row sources one after the other."""

    def __init__(self, parts: Sequence[Rows]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        part = int(np.searchsorted(self.ends, index, side="right"))
        return self.parts[part][index - (int(self.ends[part - 1]) if part else 0)]


class Repeated:
    """`count` rows of `rows`, repeated in order as often as needed: replay data (an old language mixed into
    continued pre-training so the model keeps it)."""

    def __init__(self, rows: Rows, count: int):
        if count and not len(rows):
            raise DataError("the replay sources give no block of seq_len tokens")
        self.rows, self.count = rows, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Row:
        if not 0 <= index < self.count:
            raise IndexError(f"row {index} of {self.count}")
        return self.rows[index % len(self.rows)]


def replay_count(rows: int, share: float) -> int:
    """How many replay rows make up `share` of rows + replay rows."""
    if not 0 <= share < 1:
        raise DataError(f"replay share {share}: must be in [0, 1)")
    return round(share / (1 - share) * rows)


def stack(rows: Rows, indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The rows at `indices` (default: all) as arrays [n, length]."""
    chosen = [rows[int(i)] for i in (range(len(rows)) if indices is None else indices)]
    if not chosen:
        raise DataError("no rows to stack")
    return {key: np.stack([row[key] for row in chosen]) for key in chosen[0]}
