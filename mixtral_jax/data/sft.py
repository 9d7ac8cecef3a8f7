"""Instruction tuning data exactly as Chinese-Mixtral's `scripts/training/build_dataset.py` makes it (padded
or packed into training rows by mixtral_jax/data/sequences.py).

Their recipe: source = `[INST] {instruction} [/INST]` (a non-empty input is appended to the instruction after
a newline), tokenised with BOS, its labels -100; target = the string `output + "</s>"` tokenised on its own
without special tokens, which is the SentencePiece pieces of `output` (with the usual leading "▁") followed
by the EOS id; a sample whose source alone has >= max length tokens is dropped, the others are cut to max
length. One difference: a literal "</s>" (or "<s>") inside the text stays plain characters here, where
transformers would turn it into the special id.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from mixtral_jax.data.sequences import IGNORE, Example
from mixtral_jax.data.texts import DataError, json_records
from mixtral_jax.data.tokenizer import instruct_prompt


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
