"""Pre-training data: how texts (read by `mixtral_jax.data.texts`) become fixed-size token blocks (as Chinese-Mixtral's
`run_clm_pt_with_peft.py` builds them), and the shuffled, resumable, per-host batch iterator shared with SFT.

Data stays in numpy: it is read on the host, and each host hands only its own rows to the device mesh, split
over the mesh's batch axes (`batch_split` checks that a global batch divides evenly over them).
"""

from __future__ import annotations

import math
from itertools import chain, islice
from typing import Iterable, Mapping, Sequence

import numpy as np

from mixtral_jax.data.texts import DataError
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


def pretrain_blocks(texts: Iterable[str], tokenizer, block_size: int = 1024, group_lines: int = 1000,
                    add_eos: bool = True) -> np.ndarray:
    """int32 [N, block_size] token blocks, built as Chinese-Mixtral's run_clm_pt_with_peft.py builds them.

    Each line is tokenised with BOS and, because their script sets `tokenizer.add_eos_token = True`, EOS.
    Their `group_texts` runs under `datasets.map(batched=True)`, so lines are concatenated and cut per chunk
    of `group_lines` (1000, map's default batch size) lines, and each chunk's remainder is dropped. Unlike
    theirs, a chunk shorter than one block is dropped too (they keep it as one short block) so every block
    has the same shape. (With their `num_proc=8` the chunks restart at each of the 8 shards; here they run
    over the whole stream.)
    """
    eos = [tokenizer.eos_id] if add_eos else []
    blocks = []
    lines = iter(texts)
    while chunk := list(islice(lines, group_lines)):
        ids = list(chain.from_iterable(tokenizer.encode(text, add_bos=True) + eos for text in chunk))
        usable = len(ids) // block_size * block_size
        if usable:
            blocks.append(np.asarray(ids[:usable], dtype=np.int32).reshape(-1, block_size))
    if not blocks:
        return np.zeros((0, block_size), np.int32)
    return np.concatenate(blocks)


def mix_replay(blocks: np.ndarray, replay: np.ndarray, share: float) -> np.ndarray:
    """`blocks` followed by replay blocks making up `share` of the result, the replay blocks repeated in
    order as often as needed (an old language mixed into continued pre-training so the model keeps it)."""
    if not 0 <= share < 1:
        raise DataError(f"replay share {share}: must be in [0, 1)")
    count = round(share / (1 - share) * len(blocks))
    if count == 0:
        return blocks
    if len(replay) == 0:
        raise DataError("the replay sources give no block of seq_len tokens")
    return np.concatenate([blocks, np.resize(replay, (count, replay.shape[1]))])


def pretrain_dataset(blocks: np.ndarray) -> dict[str, np.ndarray]:
    """Causal-LM rows: labels are the inputs (the loss shifts them) and every token is attended to."""
    blocks = np.asarray(blocks, dtype=np.int32)
    return {"input_ids": blocks, "labels": blocks.copy(), "attention_mask": np.ones_like(blocks)}


class BatchIterator:
    """Endless global batches of `global_batch` rows over in-memory arrays, reshuffled each epoch.

    The order of epoch e is `default_rng([seed, e]).permutation(N)`, so it depends on nothing but the seed,
    which is what lets `restore` resume exactly. The last incomplete global batch of an epoch is dropped.
    Each host gets only its rows of each global batch (`mixtral_jax.parallel.distributed.host_rows`).
    `sources` (the files or names the arrays were read from) name them in an error.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], global_batch: int, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None, sources: Sequence[str] = ()):
        lengths = {key: len(value) for key, value in arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise DataError(f"the data arrays must have one common length, got {lengths}")
        self.arrays = dict(arrays)
        self.rows = next(iter(lengths.values()))
        self.global_batch = global_batch
        self.host_slice = host_rows(global_batch, process_index, process_count)
        if self.steps_per_epoch == 0:
            named = f"{', '.join(sources)}: " if sources else ""
            raise DataError(f"{named}{self.rows} examples are fewer than one global batch of {global_batch}")
        self.seed, self.epoch, self.position = int(seed), 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.rows))
        return self._order[1]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch
        rows = self._permutation()[start:start + self.global_batch][self.host_slice]
        self.position += 1
        return {key: value[rows] for key, value in self.arrays.items()}

    def state(self) -> dict[str, int]:
        """Plain ints, for a checkpoint's metadata."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: Mapping[str, int]) -> None:
        epoch, position, seed = (int(state[key]) for key in ("epoch", "position", "seed"))
        if not 0 <= position <= self.steps_per_epoch or epoch < 0:
            raise DataError(f"data state {dict(state)} does not fit {self.steps_per_epoch} steps per epoch")
        self.epoch, self.position, self.seed = epoch, position, seed
        self._order = None
