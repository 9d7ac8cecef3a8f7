"""`data prepare`'s work: tokenise sources once, in parallel worker processes, into a prepared store
(mixtral_jax/data/store.py) that the trainer memory-maps at every start.

Pre-training tasks are `LINE_CHUNKS_PER_TASK` chunks of `group_lines` documents (blocks never cross a chunk,
mixtral_jax/data/pretrain.py, so chunks are independent); the workers read a local text file's lines
themselves (mixtral_jax/data/text_pieces.py), so the parent's work does not grow with the lines. SFT tasks are
`SFT_CHUNK` records the parent reads. Results come back in order, so the store holds exactly the sequences the
trainer builds from the same raw sources. At most a few tasks per worker are in flight: memory does not grow
with the corpus.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import tempfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from mixtral_jax.data import pretrain, sft, store, text_pieces
from mixtral_jax.data.sequences import Examples
from mixtral_jax.data.texts import DataError
from mixtral_jax.data.tokenizer import Tokenizer, identity, load_tokenizer
from mixtral_jax.io import paths
from mixtral_jax.io.output_dir import output_directory

SFT_CHUNK = 1000  # records a task
LINE_CHUNKS_PER_TASK = 8  # pre-training chunks a task: fewer round trips to the workers
IN_FLIGHT_PER_WORKER = 4

_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _blocks_task(pieces: list[text_pieces.Piece], group_lines: int, seq_len: int, part: str) -> tuple[int, list]:
    """Writes the blocks of the task's chunks to the file `part` (the parent moves them into the shards);
    -> (their rows, the UTF-8 bytes of each piece)."""
    texts, sizes = text_pieces.read_pieces(pieces)
    blocks = np.concatenate([pretrain.chunk_blocks(lines, _worker_tokenizer, seq_len)
                             for lines in pretrain.chunked(texts, group_lines)])
    blocks.astype("<i4", copy=False).tofile(part)
    return len(blocks), sizes


def _examples_task(records: list[dict], seq_len: int) -> tuple[Examples, int]:
    examples, dropped = sft.build_sft(records, _worker_tokenizer, seq_len)
    return Examples.from_pairs(examples), dropped


class _SourceSizes:
    """Counts the text bytes per source (the progress bar's MB/s)."""

    def __init__(self, bar):
        self.bar, self.bytes = bar, collections.Counter()

    def records(self, sources: Sequence[str]) -> Iterator[dict]:
        for source in sources:
            for record in sft.read_alpaca(source):
                self.add(source, sum(len(str(value).encode("utf-8")) for value in record.values()))
                yield record

    def add(self, source: str, size: int) -> None:
        self.bytes[source] += size
        self.bar.update(size)


def _in_order(task: Callable, calls: Iterable[tuple], workers: int, tokenizer: Tokenizer):
    """(args, task(*args)) for every args of `calls`, in order: in this process with one worker, else in a pool
    of `workers` processes (each loading the tokenizer from its path) with a bounded number of calls in flight."""
    global _worker_tokenizer
    if workers == 1:
        _worker_tokenizer = tokenizer
        yield from ((args, task(*args)) for args in calls)
        return
    context = multiprocessing.get_context("spawn")  # the parent may hold JAX's threads: never fork it
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer.path,)) as pool:
        pending = collections.deque()
        for args in calls:
            pending.append((args, pool.apply_async(task, args)))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                args, result = pending.popleft()
                yield args, result.get()
        while pending:
            args, result = pending.popleft()
            yield args, result.get()


def prepare(sources: Sequence[str], out: str, kind: str = "pretrain", seq_len: int = 1024,
            tokenizer: str | None = None, group_lines: int = 1000, workers: int | None = None,
            text_field: str = "text", shard_rows: int = store.DEFAULT_SHARD_ROWS, progress: bool = True) -> dict:
    """Tokenises `sources` into the store `out` (local or gs://); returns its manifest. `workers` defaults to
    every core. `out` appears whole or not at all."""
    if not sources:
        raise DataError("data prepare: no sources given")
    if kind not in store.KINDS:
        raise DataError(f"kind {kind!r}: expected one of {', '.join(store.KINDS)}")
    tok = load_tokenizer(tokenizer)
    workers = workers or os.cpu_count() or 1
    with _output(out) as directory, tqdm(desc=f"prepare {kind}", unit="B", unit_scale=True, unit_divisor=1024,
                                         disable=not progress, dynamic_ncols=True) as bar:
        sizes, writer = _SourceSizes(bar), store.StoreWriter(directory, kind, seq_len, shard_rows)
        dropped = 0
        if kind == "pretrain":
            tasks = text_pieces.tasks(sources, text_field, group_lines * LINE_CHUNKS_PER_TASK)
            parts = os.path.join(directory, ".parts")
            os.mkdir(parts)
            calls = ((task, group_lines, seq_len, os.path.join(parts, f"{index}.bin"))
                     for index, task in enumerate(tasks))
            for (task, *_, part), (rows, piece_bytes) in _in_order(_blocks_task, calls, workers, tok):
                writer.add_block_file(part, rows)
                for piece, size in zip(task, piece_bytes):
                    sizes.add(sources[piece.source], size)
            os.rmdir(parts)
            rules = {"group_lines": group_lines, "add_bos": True, "add_eos": True, "text_field": text_field,
                     "recipe": "run_clm_pt_with_peft.py group_texts per chunk, remainders dropped"}
        else:
            chunks = pretrain.chunked(sizes.records(sources), SFT_CHUNK)
            calls = ((chunk, seq_len) for chunk in chunks)
            for _, (examples, chunk_dropped) in _in_order(_examples_task, calls, workers, tok):
                writer.add_examples(examples)
                dropped += chunk_dropped
            rules = {"recipe": "build_dataset.py: [INST] prompt [/INST] with BOS, output + EOS, cut to seq_len, "
                               "samples whose prompt fills seq_len dropped"}
        bar.set_postfix(sequences=f"{writer.rows:,}", tokens=f"{writer.tokens:,}")
        text_bytes = sum(sizes.bytes.values())
        return writer.finish(tokenizer={"path": tok.path, **identity(tok)}, rules=rules,
                             sources=[{"source": s, "bytes": sizes.bytes[s]} for s in sources],
                             counts={"dropped": dropped, "text_bytes": text_bytes})


class _output:
    """A local store is built beside `out` and renamed when complete (io/output_dir.py); a gs:// one is built in
    a local temporary directory and uploaded, the manifest last."""

    def __init__(self, out: str):
        self.out = out

    def __enter__(self) -> str:
        if paths.is_remote(self.out):
            self._scratch = tempfile.TemporaryDirectory(prefix="mixtral-jax-prepare-")
            return self._scratch.name
        self._local = output_directory(self.out)
        return self._local.__enter__()

    def __exit__(self, *exc) -> None:
        if not paths.is_remote(self.out):
            return self._local.__exit__(*exc)
        try:
            if exc[0] is None:
                _upload(self._scratch.name, self.out)
        finally:
            self._scratch.cleanup()


def _upload(local: str, out: str) -> None:
    target = paths.as_path(out)
    if (target / store.MANIFEST).exists():
        (target / store.MANIFEST).unlink()  # an older store there stops being one before its shards change
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(local))
    for name in [n for n in names if n != store.MANIFEST] + [store.MANIFEST]:
        paths.as_path(os.path.join(local, name)).copy(target / name, overwrite=True)
