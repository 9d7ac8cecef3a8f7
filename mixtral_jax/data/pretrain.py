"""Pre-training sequences: how texts become fixed-size token blocks, as Chinese-Mixtral's
`run_clm_pt_with_peft.py` builds them.

Each line is tokenised with BOS and, because their script sets `tokenizer.add_eos_token = True`, EOS.
Their `group_texts` runs under `datasets.map(batched=True)`, so lines are concatenated and cut per chunk of
`group_lines` (1000, map's default batch size) lines, and each chunk's remainder is dropped. Unlike theirs, a
chunk shorter than one block is dropped too (they keep it as one short block) so every block has the same
shape. (With their `num_proc=8` the chunks restart at each of the 8 shards; here they run over the whole
stream.) Chunks are independent of each other, which is what lets `data prepare` tokenise them in parallel.
"""

from __future__ import annotations

from itertools import chain, islice
from typing import Iterable, Iterator, Sequence

import numpy as np


def chunk_blocks(lines: Sequence[str], tokenizer, block_size: int, add_eos: bool = True) -> np.ndarray:
    """int32 [n, block_size]: the blocks of one chunk of lines (its remainder dropped)."""
    ids = list(chain.from_iterable(tokenizer.encode_lines(lines, add_eos)))
    usable = len(ids) // block_size * block_size
    return np.asarray(ids[:usable], dtype=np.int32).reshape(-1, block_size)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """The stream cut into lists of `size` items (the last shorter): for texts, the chunks of `group_lines`
    lines that blocks never cross."""
    items = iter(items)
    while chunk := list(islice(items, size)):
        yield chunk


def pretrain_blocks(texts: Iterable[str], tokenizer, block_size: int = 1024, group_lines: int = 1000,
                    add_eos: bool = True) -> np.ndarray:
    """int32 [N, block_size]: every chunk's blocks, in order."""
    blocks = [chunk_blocks(chunk, tokenizer, block_size, add_eos) for chunk in chunked(texts, group_lines)]
    return np.concatenate(blocks) if blocks else np.zeros((0, block_size), np.int32)
