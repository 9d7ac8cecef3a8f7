"""Multiple-choice exams (C-Eval layout) scored as Chinese-Mixtral's C-Eval evaluator scores them.

Data: `{DIR}/{dev,val,test}/{subject}_{split}.csv` with columns `id,question,A,B,C,D,answer` (dev also has
`explanation`; C-Eval's test split has no answers). Cells are read as pandas reads them, as the reference did
(so an all-numeric option column prints as pandas prints numbers, and "NA"/"None"/empty cells as "nan").

Prompt: `format_example`, `few_shot_history` and `build_prompt` below are the reference's `format_example`,
`generate_mixtral_few_shot_prompt`, `generate_mixtral_inst_few_shot_prompt` and its question template.
Score of option X: the next-token logit of `encode("X")[0]` (no special tokens: the piece "▁X") plus that of
`encode("：X")[-1]` (the bare piece "X"); the prediction is the argmax (the first on a tie). The reference read
those logits from `generate(...).scores`, which its sampling config had passed through a repetition penalty of
1.1; `repetition_penalty` reproduces that (default 1.0: the raw logits, as DESIGN.md states the rule).

Batched: prompts are sorted by length, left-padded to a multiple of `pad_multiple` and run `batch` at a time,
so each (batch, length) bucket compiles once; the logits are read at the last position.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.report import write_json
from eval.subjects import CATEGORIES, category

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
COLUMNS = ("id", "question", "A", "B", "C", "D")


class MCQDataError(ValueError):
    """A data file that cannot be read as the C-Eval layout; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    subject: str
    row: int                 # 0-based index of the data row in its CSV (the reference's row_index)
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str | None       # None where the split has no answers (C-Eval test)


# --- data ---------------------------------------------------------------------------------------------------

def split_path(data_dir: str, subject: str, split: str) -> str:
    return os.path.join(data_dir, split, f"{subject}_{split}.csv")


def list_subjects(data_dir: str, split: str = "val") -> list[str]:
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        raise MCQDataError(f"{folder}: no such directory (expected {{dev,val,test}}/{{subject}}_{{split}}.csv)")
    suffix = f"_{split}.csv"
    subjects = sorted(name[: -len(suffix)] for name in os.listdir(folder) if name.endswith(suffix))
    if not subjects:
        raise MCQDataError(f"{folder}: no *{suffix} files")
    return subjects


def _check_csv(path: str, need_answer: bool) -> list[str]:
    """Every record must have the header's number of fields, the C-Eval columns, and (where answers are
    required) an answer in A-D. Returns the header."""
    if not os.path.isfile(path):
        raise MCQDataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise MCQDataError(f"{path}: empty file")
            missing = [c for c in COLUMNS + (("answer",) if need_answer else ()) if c not in header]
            if missing:
                raise MCQDataError(f"{path}: line 1: missing column(s) {', '.join(missing)} (header: {header})")
            answer_at = header.index("answer") if "answer" in header else None
            start = reader.line_num + 1
            for record in reader:
                if len(record) != len(header):
                    raise MCQDataError(f"{path}: line {start}: {len(record)} fields, expected {len(header)} "
                                       f"({','.join(header)})")
                if need_answer and record[answer_at].strip() not in LETTERS:
                    raise MCQDataError(f"{path}: line {start}: field 'answer' is {record[answer_at]!r}, "
                                       f"expected one of A, B, C, D")
                start = reader.line_num + 1
        except csv.Error as err:
            raise MCQDataError(f"{path}: line {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise MCQDataError(f"{path}: not UTF-8 ({err})") from None
    return header


def read_split(data_dir: str, subject: str, split: str, need_answer: bool | None = None) -> list[Question]:
    """The questions of one subject's split, cells as the reference's `pd.read_csv` gives them."""
    import pandas as pd

    path = split_path(data_dir, subject, split)
    if need_answer is None:
        need_answer = split != "test"
    header = _check_csv(path, need_answer)
    frame = pd.read_csv(path)
    has_answer = "answer" in header
    questions = []
    for row, line in frame.iterrows():
        answer = str(line["answer"]).strip() if has_answer else None
        if answer is not None and answer not in LETTERS:
            answer = None
        questions.append(Question(subject, int(row), f"{line['id']}", f"{line['question']}",
                                  tuple(f"{line[c]}" for c in LETTERS), answer))
    return questions


# --- prompts (the reference's, byte for byte) -------------------------------------------------------------

def format_example(q: Question, include_answer: bool) -> str:
    example = q.question
    for letter, option in zip(LETTERS, q.options):
        example += f"\n{letter}. {option}"
    if include_answer:
        return example + "\n答案：" + q.answer + "\n\n"
    return example + "\n答案："


def few_shot_history(subject: str, dev: Sequence[Question], shots: int, instruct: bool) -> str:
    if shots == 0:
        return ""
    if shots > len(dev):
        raise MCQDataError(f"{dev[0].subject if dev else subject}: {shots} shots asked, the dev split has "
                           f"{len(dev)} questions")
    header = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    if not instruct:
        return header + "".join(format_example(q, include_answer=True) for q in dev[:shots])
    history = f"[INST] {header} [/INST]好的，我会结合{subject}相关知识回答"
    for q in dev[:shots]:
        text = q.question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
        history += "[INST] " + text + "\n答案： [/INST]" + q.answer + "\n"
    return history


def build_prompt(q: Question, history: str, instruct: bool) -> str:
    question = format_example(q, include_answer=False)
    if instruct:
        question = f"[INST] {question} [/INST]"
    return history + question


# --- scoring ------------------------------------------------------------------------------------------------

def choice_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(ids of "▁A".."▁D", ids of bare "A".."D") as the reference takes them from its tokenizer."""
    spaced = [tokenizer.encode(x, add_bos=False)[0] for x in LETTERS]
    bare = [tokenizer.encode("：" + x)[-1] for x in LETTERS]
    return spaced, bare


@partial(jax.jit, static_argnames=("graphdef",))
def _candidate_logits(graphdef, state, input_ids, attention_mask, candidates):
    """Only the candidates' columns of the head at the last position: [B, 8] logits instead of [B, T, vocab]
    (XLA does not narrow the head by itself; on small models that head is most of the work and the memory)."""
    model = nnx.merge(graphdef, state)
    last = model(input_ids, attention_mask, return_hidden=True).hidden_states[:, -1]  # left padding
    return jnp.einsum("bd,dc->bc", last, model.output_head()[:, candidates]).astype(jnp.float32)


def bucket_batches(lengths: Sequence[int], batch: int, pad_multiple: int) -> list[tuple[int, list[int]]]:
    """(padded length, prompt indices) per batch: sorted by length, lengths rounded up to pad_multiple."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: dict[int, list[int]] = {}
    for i in order:
        buckets.setdefault(pad_multiple * math.ceil(lengths[i] / pad_multiple), []).append(i)
    return [(width, members[s: s + batch]) for width, members in sorted(buckets.items())
            for s in range(0, len(members), batch)]


def candidate_logits(model, prompts: Sequence[Sequence[int]], candidates: Sequence[int], batch: int = 8,
                     pad_multiple: int = 64, pad_id: int = 0, progress: bool = False) -> np.ndarray:
    """[len(prompts), len(candidates)] fp32: each prompt's next-token logits of the candidate ids."""
    from tqdm import tqdm

    graphdef, state = nnx.split(model)
    cand = jnp.asarray(candidates, jnp.int32)
    out = np.zeros((len(prompts), len(candidates)), np.float32)
    batches = bucket_batches([len(p) for p in prompts], batch, pad_multiple)
    for width, members in tqdm(batches, desc="mcq", unit="batch", disable=not progress):
        rows = members + [members[0]] * (batch - len(members))  # a fixed batch shape: one compile per width
        ids = np.full((batch, width), pad_id, np.int32)
        mask = np.zeros((batch, width), bool)
        for r, i in enumerate(rows):
            seq = prompts[i]
            ids[r, width - len(seq):], mask[r, width - len(seq):] = seq, True
        logits = np.asarray(_candidate_logits(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cand))
        out[members] = logits[: len(members)]
    return out


def option_scores(logits: np.ndarray, prompts: Sequence[Sequence[int]], candidates: Sequence[int],
                  repetition_penalty: float = 1.0) -> np.ndarray:
    """[N, 4]: logit("▁X") + logit("X"); with a penalty, transformers' RepetitionPenaltyLogitsProcessor is
    applied first (ids present in the prompt: negative logits times p, positive ones divided by p)."""
    logits = logits.astype(np.float32).copy()
    if repetition_penalty != 1.0:
        for n, prompt in enumerate(prompts):
            present = set(prompt)
            for j, c in enumerate(candidates):
                if c in present:
                    v = logits[n, j]
                    logits[n, j] = v * repetition_penalty if v < 0 else v / repetition_penalty
    return logits[:, :4] + logits[:, 4:8]


# --- the evaluation -----------------------------------------------------------------------------------------

def build_prompts(data_dir: str, subjects: Sequence[str], shots: int, instruct: bool,
                  split: str = "val") -> tuple[list[Question], list[str]]:
    questions, texts = [], []
    for subject in subjects:
        dev = read_split(data_dir, subject, "dev", need_answer=True) if shots else []
        history = few_shot_history(subject, dev, shots, instruct)
        for q in read_split(data_dir, subject, split):
            questions.append(q)
            texts.append(build_prompt(q, history, instruct))
    return questions, texts


def _accuracy(correct: int, total: int) -> float | None:
    return 100.0 * correct / total if total else None


def summarize(predictions: Sequence[dict]) -> dict:
    """overall (micro: all correct / all answered questions), per subject and per category, in percent."""
    subjects: dict[str, dict] = {}
    for p in predictions:
        s = subjects.setdefault(p["subject"], {"category": category(p["subject"]), "correct": 0, "total": 0})
        if p["answer"] is not None:
            s["total"] += 1
            s["correct"] += int(p["predicted"] == p["answer"])
    categories = {c: {"correct": 0, "total": 0} for c in CATEGORIES}
    for s in subjects.values():
        categories[s["category"]]["correct"] += s["correct"]
        categories[s["category"]]["total"] += s["total"]
    for entry in [*subjects.values(), *categories.values()]:
        entry["accuracy"] = _accuracy(entry["correct"], entry["total"])
    correct = sum(s["correct"] for s in subjects.values())
    total = sum(s["total"] for s in subjects.values())
    return {"overall": _accuracy(correct, total), "correct": correct, "total": total,
            "subjects": subjects, "categories": {c: v for c, v in categories.items() if v["total"]}}


def evaluate(model, tokenizer, data_dir: str, shots: int = 5, instruct: bool = False,
             subjects: Sequence[str] | None = None, split: str = "val", batch: int = 8, pad_multiple: int = 64,
             repetition_penalty: float = 1.0, progress: bool = False,
             prepared: tuple[list[Question], list[str]] | None = None) -> dict:
    """`prepared`: the (questions, prompts) of `build_prompts` for these arguments, if already built."""
    if prepared is None:
        subjects = list(subjects) if subjects else list_subjects(data_dir, split)
        prepared = build_prompts(data_dir, subjects, shots, instruct, split)
    questions, texts = prepared
    prompts = [tokenizer.encode(t) for t in texts]
    spaced, bare = choice_ids(tokenizer)
    candidates = spaced + bare
    logits = candidate_logits(model, prompts, candidates, batch, pad_multiple,
                              pad_id=tokenizer.eos_id, progress=progress)
    scores = option_scores(logits, prompts, candidates, repetition_penalty)
    predictions = [{"subject": q.subject, "row": q.row, "id": q.id, "predicted": LETTERS[int(np.argmax(s))],
                    "answer": q.answer, "scores": [float(x) for x in s]} for q, s in zip(questions, scores)]
    summary = summarize(predictions)
    return {"split": split, "shots": shots, "instruct": instruct, "repetition_penalty": repetition_penalty,
            "questions": len(questions), "prompt_tokens": int(sum(len(p) for p in prompts)),
            **summary, "choice_ids": {"spaced": spaced, "bare": bare}, "predictions": predictions}


def _fmt(acc: float | None) -> str:
    return "-" if acc is None else f"{acc:.2f}"


def markdown_table(result: dict) -> str:
    lines = ["| subject | category | correct | total | accuracy |", "|---|---|---:|---:|---:|"]
    for name, s in sorted(result["subjects"].items()):
        lines.append(f"| {name} | {s['category']} | {s['correct']} | {s['total']} | {_fmt(s['accuracy'])} |")
    for name, c in result["categories"].items():
        lines.append(f"| **{name}** | | {c['correct']} | {c['total']} | {_fmt(c['accuracy'])} |")
    lines.append(f"| **overall** | | {result['correct']} | {result['total']} | {_fmt(result['overall'])} |")
    return "\n".join(lines)


def run(args) -> int:
    import time

    from mixtral_jax.hf_checkpoint import from_pretrained
    from mixtral_jax.tokenizer import check_compatible, load_tokenizer

    if args.shots < 0:
        raise ValueError(f"--shots {args.shots}: must be >= 0")
    subjects = [s for s in args.subjects.split(",") if s] if args.subjects else list_subjects(args.data, args.split)
    prepared = build_prompts(args.data, subjects, args.shots, args.instruct, args.split)  # bad data: before the model
    tokenizer = load_tokenizer(args.tokenizer)
    model = from_pretrained(args.model, dtype=args.dtype, moe_backend=args.moe_backend,
                            show_progress=not args.quiet)
    check_compatible(tokenizer, model.config.vocab_size, f"{args.model}/config.json")
    start = time.perf_counter()
    result = evaluate(model, tokenizer, args.data, args.shots, args.instruct, subjects, args.split, args.batch,
                      args.pad_multiple, args.repetition_penalty, progress=not args.quiet, prepared=prepared)
    seconds = time.perf_counter() - start
    result = {"model": args.model, "data": args.data, "tokenizer": args.tokenizer or "mixtral (mistral-common)",
              "seconds": round(seconds, 3), "tokens_per_s": round(result["prompt_tokens"] / seconds, 1), **result}
    if args.out:
        write_json(args.out, result)
    print(markdown_table(result))
    return 0
