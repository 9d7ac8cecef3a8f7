"""The documents of pre-training sources cut into tasks of a fixed number of documents, for `data prepare`'s
worker processes to read themselves.

A local `.txt` file becomes byte ranges of whole lines (`LineRange`): the parent only finds the lines, with
numpy over 16 MiB reads, and each worker reads, decodes and splits its own ranges. So the parent does no work per
line and keeps up with any number of workers (its ceiling is in the README, `python -m bench.bench_data`). Other
sources (JSON, `hf:`, `tfds:`, `bundled:`, gs://) are read by the parent as `read_texts` gives them and handed
out as lists of texts. Either way a task holds exactly the documents `read_texts` yields, in its order, empty
lines skipped, and its n-th task starts at document n x `size`.
"""

from __future__ import annotations

import dataclasses
import os
from itertools import islice
from typing import Iterator, Sequence

import numpy as np

from mixtral_jax.data.texts import DataError, local_files, read_texts

READ_BYTES = 1 << 24
NEWLINE, CARRIAGE_RETURN = 10, 13


@dataclasses.dataclass(frozen=True)
class LineRange:
    """Bytes [start, end) of a local text file, whole lines; `first_line` is the line number at `start`."""

    source: int
    path: str
    start: int
    end: int
    first_line: int

    def read(self) -> tuple[list[str], int]:
        """(the non-empty lines without their line endings, their UTF-8 bytes), as read_texts reads them."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._raise_decode_error(data)
        if "\r" not in text:
            return [line for line in text.split("\n") if line], len(data) - data.count(b"\n")
        lines = [line for line in (raw.rstrip("\r") for raw in text.split("\n")) if line]
        return lines, sum(len(line.encode("utf-8")) for line in lines)

    def _raise_decode_error(self, data: bytes):
        for lineno, raw in enumerate(data.split(b"\n"), self.first_line):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{self.path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None


@dataclasses.dataclass(frozen=True)
class TextList:
    """Texts the parent read itself (sources other than local .txt files)."""

    source: int
    texts: list[str]

    def read(self) -> tuple[list[str], int]:
        return self.texts, sum(len(text.encode("utf-8")) for text in self.texts)


Piece = LineRange | TextList


def read_pieces(pieces: Sequence[Piece]) -> tuple[list[str], list[int]]:
    """The texts of a task in order, and each piece's UTF-8 bytes."""
    texts, sizes = [], []
    for piece in pieces:
        piece_texts, size = piece.read()
        texts.extend(piece_texts)
        sizes.append(size)
    return texts, sizes


def line_ends(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per read of the file: the byte offsets just past each non-empty line, and the line number after each.
    A line is empty when it holds nothing but carriage returns (read_texts strips them with the newline)."""
    offset, lineno, carry = 0, 1, b""
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            data = carry + chunk if carry else chunk
            buf = np.frombuffer(data, np.uint8)
            newlines = np.flatnonzero(buf == NEWLINE)
            if not len(newlines):
                carry = data
                continue
            starts = np.concatenate(([0], newlines[:-1] + 1))
            nonempty = newlines > starts
            maybe_blank = np.flatnonzero(nonempty & (buf[newlines - 1] == CARRIAGE_RETURN)
                                         & (buf[starts] == CARRIAGE_RETURN))
            for i in maybe_blank:  # a line that starts and ends with \r: rare outside blank CRLF lines
                nonempty[i] = bool(data[starts[i]:newlines[i]].strip(b"\r"))
            yield offset + newlines[nonempty] + 1, lineno + 1 + np.flatnonzero(nonempty)
            consumed = int(newlines[-1]) + 1
            offset, lineno, carry = offset + consumed, lineno + len(newlines), data[consumed:]
    if carry.strip(b"\r"):  # a last line without a newline
        yield np.asarray([offset + len(carry)]), np.asarray([lineno + 1])


class _Tasks:
    """Collects pieces into tasks of exactly `size` texts."""

    def __init__(self, size: int):
        self.size, self.pieces, self.count = size, [], 0

    def room(self) -> int:
        return self.size - self.count

    def add(self, piece: Piece, count: int) -> list[Piece] | None:
        """Adds a piece of `count` texts (at most room()); -> the task it completes, if it does."""
        self.pieces.append(piece)
        self.count += count
        if self.count < self.size:
            return None
        task, self.pieces, self.count = self.pieces, [], 0
        return task

    def rest(self) -> list[Piece] | None:
        return self.pieces or None


def tasks(sources: Sequence[str], text_field: str, size: int) -> Iterator[list[Piece]]:
    """The documents of `sources` (read_texts, in order) as lists of pieces of `size` documents each, the last
    one shorter."""
    collector = _Tasks(size)
    for index, source in enumerate(sources):
        files = local_files(source)
        for path in files if files is not None else [None]:
            if path is not None and path.endswith(".txt"):
                yield from _file_tasks(index, path, collector)
                continue
            texts = read_texts(source if path is None else path, text_field)
            while batch := list(islice(texts, collector.room())):
                if task := collector.add(TextList(index, batch), len(batch)):
                    yield task
    if task := collector.rest():
        yield task


def _file_tasks(source: int, path: str, collector: _Tasks) -> Iterator[list[Piece]]:
    start, first_line, pending = 0, 1, 0
    for ends, next_lines in line_ends(path):
        taken = 0
        while len(ends) - taken >= (needed := collector.room() - pending):  # this read completes a task
            last = taken + needed - 1
            end = int(ends[last])
            yield collector.add(LineRange(source, path, start, end, first_line), pending + needed)
            start, first_line, pending, taken = end, int(next_lines[last]), 0, last + 1
        pending += len(ends) - taken
    if pending:  # fewer than the task lacks: completes none
        collector.add(LineRange(source, path, start, os.path.getsize(path), first_line), pending)
