"""The pipeline's evaluation inputs, made from the bundled corpora: held-out Chinese and English texts for
the perplexity curves, and a C-Eval-layout multiple-choice set that asks for the English translation of a
held-out Chinese sentence (the skill the SFT stage teaches; dev shots come from the training split)."""

from __future__ import annotations

import csv
import os
import random

from mixtral_jax.data.corpora import hsk_english, hsk_pairs, peoples_daily
from mixtral_jax.io.output_dir import output_directory

MCQ_SUBJECT = "hsk_translation"
LETTERS = "ABCD"


def mcq_rows(pairs: list[tuple[str, str]], count: int, seed: int, with_explanation: bool) -> list[list[str]]:
    """`count` questions: the Chinese sentence, its English translation among three others of the split."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pairs)), min(count, len(pairs)))
    rows = []
    for number, index in enumerate(chosen):
        zh, en = pairs[index]
        distractors = rng.sample([e for j, (_, e) in enumerate(pairs) if j != index and e != en], 3)
        answer = rng.randrange(4)
        options = distractors[:answer] + [en] + distractors[answer:]
        rows.append([str(number), f"“{zh}”的英文翻译是", *options, LETTERS[answer]]
                    + ([""] if with_explanation else []))
    return rows


def _write_csv(path: str, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_inputs(directory: str, mcq_questions: int, shots: int) -> dict[str, str]:
    """zh-heldout.txt, en-heldout.txt and mcq/{dev,val}/ under `directory` (written whole, then renamed)."""
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    with output_directory(directory) as tmp:
        for name, lines in (("zh-heldout.txt", peoples_daily("heldout")), ("en-heldout.txt", hsk_english("heldout"))):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        if mcq_questions:
            for split in ("dev", "val"):
                os.makedirs(os.path.join(tmp, "mcq", split))
            dev = mcq_rows(hsk_pairs("train"), max(shots, 1), seed=1, with_explanation=True)
            val = mcq_rows(hsk_pairs("heldout"), mcq_questions, seed=0, with_explanation=False)
            _write_csv(os.path.join(tmp, "mcq", "dev", f"{MCQ_SUBJECT}_dev.csv"), header + ["explanation"], dev)
            _write_csv(os.path.join(tmp, "mcq", "val", f"{MCQ_SUBJECT}_val.csv"), header, val)
    return {"zh": os.path.join(directory, "zh-heldout.txt"), "en": os.path.join(directory, "en-heldout.txt"),
            "mcq": os.path.join(directory, "mcq") if mcq_questions else None}
