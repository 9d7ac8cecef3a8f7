"""Instruction tuning data exactly as Chinese-Mixtral's `scripts/training/build_dataset.py` makes it, then
padded (one example a row) or packed (several examples a row, kept apart by segment ids).

Their recipe: source = `[INST] {instruction} [/INST]` (a non-empty input is appended to the instruction after
a newline), tokenised with BOS, its labels -100; target = the string `output + "</s>"` tokenised on its own
without special tokens, which is the SentencePiece pieces of `output` (with the usual leading "▁") followed
by the EOS id; a sample whose source alone has >= max length tokens is dropped, the others are cut to max
length. One difference: a literal "</s>" (or "<s>") inside the text stays plain characters here, where
transformers would turn it into the special id.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from mixtral_jax.data.texts import DataError, json_records
from mixtral_jax.data.tokenizer import instruct_prompt

IGNORE = -100
Example = tuple[list[int], list[int]]  # (input_ids, labels)


def read_alpaca(path: str) -> list[dict[str, str]]:
    """Records of an Alpaca JSON list or JSON lines file, local or gs:// (`instruction`, optional `input`,
    `output`), or
    of `bundled:NAME` (mixtral_jax/data/corpora.py); a missing input becomes ""."""
    if path.startswith("bundled:"):
        from mixtral_jax.data import corpora

        return corpora.bundled_instructions(path.removeprefix("bundled:"))
    records = []
    for where, record in json_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with 'instruction' and 'output'")
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: missing string field {key!r}")
        text_input = record.get("input") or ""
        if not isinstance(text_input, str):
            raise DataError(f"{where}: field 'input' is not a string")
        records.append({"instruction": record["instruction"], "input": text_input, "output": record["output"]})
    return records


def sft_example(tokenizer, instruction: str, input: str, output: str, max_length: int) -> Example | None:
    """(input_ids, labels) of one record, or None when the prompt alone fills `max_length` (dropped)."""
    if input:
        instruction = f"{instruction}\n{input}"
    source = tokenizer.encode(instruct_prompt(instruction), add_bos=True)
    if len(source) >= max_length:
        return None
    target = tokenizer.encode(output, add_bos=False) + [tokenizer.eos_id]
    return (source + target)[:max_length], ([IGNORE] * len(source) + target)[:max_length]


def build_sft(records: Iterable[Mapping[str, str]], tokenizer, max_length: int) -> tuple[list[Example], int]:
    """The examples of all records kept, and how many were dropped for an over-long prompt."""
    examples, dropped = [], 0
    for record in records:
        example = sft_example(tokenizer, record["instruction"], record.get("input") or "", record["output"],
                              max_length)
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def _rows(count: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((count, length), pad_id, np.int32),
            "labels": np.full((count, length), IGNORE, np.int32),
            "attention_mask": np.zeros((count, length), np.int32)}


def _check_lengths(examples: Sequence[Example], length: int) -> None:
    longest = max((len(ids) for ids, _ in examples), default=0)
    if longest > length:
        raise DataError(f"an example has {longest} tokens, more than the row length {length}")


def pad_examples(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example a row, padded on the right (input pad_id, the EOS in their recipe; labels -100; mask 0)."""
    _check_lengths(examples, length)
    out = _rows(len(examples), length, pad_id)
    for row, (ids, labels) in enumerate(examples):
        out["input_ids"][row, :len(ids)] = ids
        out["labels"][row, :len(ids)] = labels
        out["attention_mask"][row, :len(ids)] = 1
    return out


def pack_examples(examples: Sequence[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Consecutive examples share a row while they fit (in order, none split); a new row starts when the next
    one does not. attention_mask holds segment ids 1, 2, 3, ... per example and 0 on padding: the model keeps
    attention within a segment and restarts positions there. Each segment's first label is -100 (its BOS is
    in the source), so the shifted loss never predicts one example from another."""
    _check_lengths(examples, length)
    packed: list[list[Example]] = []
    used = length
    for example in examples:
        if used + len(example[0]) > length:
            packed.append([])
            used = 0
        packed[-1].append(example)
        used += len(example[0])
    out = _rows(len(packed), length, pad_id)
    for row, members in enumerate(packed):
        start = 0
        for segment, (ids, labels) in enumerate(members, 1):
            end = start + len(ids)
            out["input_ids"][row, start:end] = ids
            out["labels"][row, start:end] = labels
            out["attention_mask"][row, start:end] = segment
            start = end
    return out
