"""Where texts come from: local or gs:// text and JSON files, directories and globs of them, saved or hub
datasets (`hf:`), TensorFlow Datasets (`tfds:`) and the bundled corpora, read one document at a time.
Shared by pre-training (`train/data.py`) and vocabulary extension (`convert/vocab_cli.py`)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Any, Iterable, Iterator, Mapping

from mixtral_jax.io import paths

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


class DataError(ValueError):
    """Unreadable training data; the message names the file (and line or record) at fault."""


def read_texts(source: str, text_field: str = "text") -> Iterator[str]:
    """The documents of `source`, one at a time; empty ones are skipped everywhere.

    `source` is a `.txt` file (one document a line), a `.jsonl`/`.json` file (JSON lines, or one JSON list,
    of objects with a string `text_field`), a directory or glob of such files (read in sorted order), each
    of these local or on gs:// (a gs:// glob has wildcards in its last part only),
    `hf:PATH_OR_NAME[:split]` (a dataset saved with `save_to_disk`, or a Hugging Face hub name),
    `tfds:NAME[:split]` (TensorFlow Datasets, under $TFDS_DATA_DIR if set) or `bundled:NAME`
    (mixtral_jax/data/corpora.py).
    The split defaults to "train".
    """
    if source.startswith("bundled:"):
        from mixtral_jax.data import corpora

        return iter(corpora.bundled_texts(source.removeprefix("bundled:")))
    if source.startswith("hf:"):
        return _hf_texts(source, text_field)
    if source.startswith("tfds:"):
        return _tfds_texts(source, text_field)
    return (text for path in _text_files(source) for text in _file_texts(path, text_field) if text)


def local_files(source: str) -> list[str] | None:
    """The local files a file, directory or glob source names, in the order read_texts reads them; None for
    the other sources."""
    if source.startswith(("bundled:", "hf:", "tfds:")) or paths.is_remote(source):
        return None
    return _text_files(source)


def _name_and_split(rest: str) -> tuple[str, str]:
    name, sep, split = rest.rpartition(":")
    return (name, split) if sep else (rest, "train")


def _hf_texts(source: str, text_field: str) -> Iterator[str]:
    import datasets

    rest = source.removeprefix("hf:")
    name, split = (rest, "train") if os.path.isdir(rest) else _name_and_split(rest)
    try:
        if os.path.isdir(name):
            dataset = datasets.load_from_disk(name)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{source}: cannot load the dataset ({err})") from None
    if text_field not in dataset.column_names:
        raise DataError(f"{source}: no column {text_field!r} (columns: {', '.join(dataset.column_names)})")
    return (text for batch in dataset.select_columns([text_field]).iter(batch_size=1000)
            for text in batch[text_field] if text)


def _tfds_texts(source: str, text_field: str) -> Iterator[str]:
    if importlib.util.find_spec("tensorflow") is None:
        raise DataError(f"{source}: tensorflow_datasets reads data through tensorflow, which is not installed; "
                        "install it (pip install tensorflow) or convert the data to .jsonl")
    import tensorflow_datasets as tfds

    name, split = _name_and_split(source.removeprefix("tfds:"))
    try:
        dataset = tfds.load(name, split=split, data_dir=os.environ.get("TFDS_DATA_DIR"))
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{source}: cannot load the dataset ({err})") from None
    return _tfds_examples(source, tfds.as_numpy(dataset), text_field)


def _tfds_examples(source: str, examples: Iterable[Mapping[str, Any]], text_field: str) -> Iterator[str]:
    for example in examples:
        if text_field not in example:
            raise DataError(f"{source}: no feature {text_field!r} (features: {', '.join(example)})")
        text = example[text_field]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        if text:
            yield text


def _text_files(source: str) -> list[str]:
    if paths.is_remote(source):
        return _remote_text_files(source)
    if os.path.isfile(source):
        if not source.endswith(TEXT_SUFFIXES):
            raise DataError(f"{source}: unknown data file type (expected {', '.join(TEXT_SUFFIXES)})")
        return [source]
    if os.path.isdir(source):
        found = glob.glob(os.path.join(glob.escape(source), "**", "*"), recursive=True)
    else:
        found = glob.glob(source, recursive=True)
    files = sorted(p for p in found if os.path.isfile(p) and p.endswith(TEXT_SUFFIXES))
    if not files:
        raise DataError(f"{source}: no {'/'.join(TEXT_SUFFIXES)} files there")
    return files


def _remote_text_files(source: str) -> list[str]:
    """As for a local source, but a glob may have wildcards in its last part only (one listing, not a
    crawl of the bucket)."""
    path = paths.as_path(source)
    if path.is_file():
        if not source.endswith(TEXT_SUFFIXES):
            raise DataError(f"{source}: unknown data file type (expected {', '.join(TEXT_SUFFIXES)})")
        return [source]
    if path.is_dir():
        found = _remote_tree(path)
    elif any(c in str(path.parent) for c in "*?["):
        raise DataError(f"{source}: in a gs:// path, wildcards may only be in the last part")
    else:
        found = [p for p in path.parent.glob(path.name) if not p.is_dir()]
    files = sorted(str(p) for p in found if str(p).endswith(TEXT_SUFFIXES))
    if not files:
        raise DataError(f"{source}: no {'/'.join(TEXT_SUFFIXES)} files there")
    return files


def _remote_tree(directory) -> list:
    """Every file below `directory` (epath's walk loses the gs:// of the paths it yields)."""
    found = []
    for child in directory.iterdir():
        found.extend(_remote_tree(child) if child.is_dir() else [child])
    return found


def _file_texts(path: str, text_field: str) -> Iterator[str]:
    if path.endswith(".txt"):
        with paths.open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    yield line.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        return
    for where, record in json_records(path):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: no string field {text_field!r}")
        yield text


def json_records(path: str) -> Iterator[tuple[str, Any]]:
    """(location, value) for each record of a JSON list file or a JSON lines file; the location
    (`file: record i` or `file:line`) is what error messages about that record should start with."""
    with paths.open_binary(path) as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            try:
                records = json.loads(f.read())
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
            yield from ((f"{path}: record {i}", record) for i, record in enumerate(records))
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line.decode("utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})") from None
