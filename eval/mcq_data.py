"""Multiple-choice exam data: the official CSV layouts of C-Eval, CMMLU and MMLU, and Hugging Face datasets.

CSV layouts (each benchmark's own release):
* C-Eval: `{dev,val,test}/{subject}_{split}.csv`, header `id,question,A,B,C,D,answer` (dev adds
  `explanation`; the test split has no answers);
* CMMLU: `{dev,test}/{subject}.csv`, header `,Question,A,B,C,D,Answer` (the first column is a row index);
* MMLU: `{dev,val,test}/{subject}_{split}.csv` with no header: question,A,B,C,D,answer.
Cells are read as the reference evaluators read them, with pandas (an all-numeric option column prints as
pandas prints numbers, and "NA"/"None"/empty cells as "nan").

Hugging Face (`hf:NAME[@REVISION]`): one dataset configuration per subject, as `ceval/ceval-exam`,
`haonan-li/cmmlu` and `cais/mmlu` are published, loaded with `datasets.load_dataset` (no remote code; a
repository that still has a loading script can be read from its `@refs/convert/parquet` revision). NAME may
also be a local directory holding one `DatasetDict.save_to_disk` folder per subject. Columns: C-Eval's and
CMMLU's as in their CSVs; MMLU's `question`, `choices` (4 strings) and `answer` (0-3).
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass

LETTERS = ("A", "B", "C", "D")
BENCHMARKS = ("ceval", "cmmlu", "mmlu")


class MCQDataError(ValueError):
    """Data that cannot be read as the benchmark's layout; the message names the file (and line or field)."""


@dataclass(frozen=True)
class Question:
    subject: str
    row: int                 # 0-based index of the data row in its CSV / split (the reference's row_index)
    id: str | None           # C-Eval's id column; None for CMMLU and MMLU
    question: str
    options: tuple[str, str, str, str]
    answer: str | None       # None where the split has no answers (C-Eval test)


@dataclass(frozen=True)
class Layout:
    name: str
    splits: tuple[str, ...]
    eval_split: str                  # the split the reference evaluator scores by default
    file: str                        # file name pattern inside {split}/
    header: tuple[str, ...] | None   # required header columns (None: no header line)
    question: str | int
    answer: str | int
    id: str | None = None
    test_answers: bool = True        # does the test split carry answers?

    def path(self, root: str, subject: str, split: str) -> str:
        return os.path.join(root, split, self.file.format(subject=subject, split=split))

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise MCQDataError(f"{self.name} has no split {split!r} (it has {', '.join(self.splits)})")


LAYOUTS = {
    "ceval": Layout("ceval", ("dev", "val", "test"), "val", "{subject}_{split}.csv",
                    ("id", "question", *LETTERS), "question", "answer", id="id", test_answers=False),
    "cmmlu": Layout("cmmlu", ("dev", "test"), "test", "{subject}.csv", ("Question", *LETTERS),
                    "Question", "Answer"),
    "mmlu": Layout("mmlu", ("dev", "val", "test"), "val", "{subject}_{split}.csv", None, 0, 5),
}
MMLU_FIELDS = 6


# --- the official CSVs --------------------------------------------------------------------------------------

def _check_csv(layout: Layout, path: str, need_answer: bool) -> None:
    """At least one record, every one with the header's number of fields (MMLU: 6), the layout's columns, and
    (where answers are required) an answer in A-D."""
    if not os.path.isfile(path):
        raise MCQDataError(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            if layout.header is None:
                fields, answer_at, start = MMLU_FIELDS, layout.answer, 1
                expected = "question,A,B,C,D,answer (no header)"
            else:
                header = next(reader, None)
                if header is None:
                    raise MCQDataError(f"{path}: empty file")
                need = layout.header + ((layout.answer,) if need_answer else ())
                missing = [c for c in need if c not in header]
                if missing:
                    raise MCQDataError(f"{path}: line 1: missing column(s) {', '.join(missing)} (header: {header})")
                fields, expected = len(header), ",".join(header)
                answer_at = header.index(layout.answer) if layout.answer in header else None
                start = reader.line_num + 1
            records = 0
            for records, record in enumerate(reader, 1):
                if len(record) != fields:
                    raise MCQDataError(f"{path}: line {start}: {len(record)} fields, expected {fields} ({expected})")
                if need_answer and record[answer_at].strip() not in LETTERS:
                    raise MCQDataError(f"{path}: line {start}: field 'answer' is {record[answer_at]!r}, "
                                       f"expected one of A, B, C, D")
                start = reader.line_num + 1
            if not records:
                what = "an empty file" if layout.header is None else "a header and no rows"
                raise MCQDataError(f"{path}: no questions ({what})")
        except csv.Error as err:
            raise MCQDataError(f"{path}: line {reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise MCQDataError(f"{path}: not UTF-8 ({err})") from None


def _answer(value) -> str | None:
    answer = str(value).strip()
    return answer if answer in LETTERS else None


def read_csv_split(layout: Layout, root: str, subject: str, split: str, need_answer: bool) -> list[Question]:
    import pandas as pd

    path = layout.path(root, subject, split)
    _check_csv(layout, path, need_answer)
    frame = pd.read_csv(path, header=None if layout.header is None else "infer")
    has_answer = layout.answer in frame.columns
    option_columns = LETTERS if layout.header is not None else (1, 2, 3, 4)
    return [Question(subject, int(row), None if layout.id is None else f"{line[layout.id]}", f"{line[layout.question]}",
                     tuple(f"{line[c]}" for c in option_columns), _answer(line[layout.answer]) if has_answer else None)
            for row, line in frame.iterrows()]


def csv_subjects(layout: Layout, root: str, split: str) -> list[str]:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise MCQDataError(f"{folder}: no such directory (expected {layout.name}'s "
                           f"{{{','.join(layout.splits)}}}/{layout.file})")
    prefix, suffix = layout.file.format(subject="\0", split=split).split("\0")
    subjects = sorted(name[len(prefix): len(name) - len(suffix)] for name in os.listdir(folder)
                      if name.startswith(prefix) and name.endswith(suffix))
    if not subjects:
        raise MCQDataError(f"{folder}: no {layout.file.format(subject='*', split=split)} files")
    return subjects


def detect_csv_layout(root: str) -> Layout:
    """C-Eval, CMMLU or MMLU from the file names and the first line of one file."""
    for split in ("dev", "val", "test"):
        folder = os.path.join(root, split)
        names = sorted(n for n in os.listdir(folder) if n.endswith(".csv")) if os.path.isdir(folder) else []
        if not names:
            continue
        path = os.path.join(folder, names[0])
        with open(path, newline="", encoding="utf-8") as f:
            first = next(csv.reader(f), [])
        if not names[0].endswith(f"_{split}.csv"):
            return LAYOUTS["cmmlu"]
        return LAYOUTS["ceval"] if {"id", "question", "answer"} <= set(first) else LAYOUTS["mmlu"]
    raise MCQDataError(f"{root}: no dev/, val/ or test/ folder with CSV files (C-Eval, CMMLU or MMLU layout)")


# --- Hugging Face datasets ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _hf_subject(name: str, revision: str | None, subject: str):
    import datasets

    if os.path.isdir(name):
        folder = os.path.join(name, subject)
        if not os.path.isfile(os.path.join(folder, "dataset_dict.json")):
            raise MCQDataError(f"{folder}: not a saved DatasetDict (expected save_to_disk output per subject)")
        return datasets.load_from_disk(folder)
    return datasets.load_dataset(name, subject, revision=revision)


def _hf_split(dataset_dict, where: str, split: str):
    for candidate in (split, {"val": "validation"}.get(split)):
        if candidate in dataset_dict:
            return dataset_dict[candidate]
    raise MCQDataError(f"{where}: no split {split!r} (it has {', '.join(dataset_dict)})")


def _hf_question(layout: Layout, where: str, subject: str, row: int, record: dict) -> Question:
    try:
        if layout.name == "mmlu":
            choices, answer = record["choices"], record["answer"]
            if len(choices) != 4:
                raise MCQDataError(f"{where}: row {row}: field 'choices' has {len(choices)} entries, expected 4")
            answer = LETTERS[answer] if isinstance(answer, int) and 0 <= answer < 4 else _answer(answer)
            return Question(subject, row, None, f"{record['question']}", tuple(f"{c}" for c in choices), answer)
        return Question(subject, row, None if layout.id is None else f"{record[layout.id]}",
                        f"{record[layout.question]}", tuple(f"{record[c]}" for c in LETTERS),
                        _answer(record.get(layout.answer, "")))
    except KeyError as err:
        raise MCQDataError(f"{where}: missing field {err} (columns: {', '.join(record)})") from None


def read_hf_split(layout: Layout, name: str, revision: str | None, subject: str, split: str,
                  need_answer: bool) -> list[Question]:
    where = f"{name}/{subject}/{split}"
    questions = [_hf_question(layout, where, subject, row, record)
                 for row, record in enumerate(_hf_split(_hf_subject(name, revision, subject), where, split))]
    if not questions:
        raise MCQDataError(f"{where}: no questions")
    for q in questions:
        if need_answer and q.answer is None:
            raise MCQDataError(f"{where}: row {q.row}: field 'answer' is not one of A, B, C, D")
    return questions


def _saved_subjects(name: str) -> list[str]:
    found = sorted(s for s in os.listdir(name) if os.path.isfile(os.path.join(name, s, "dataset_dict.json")))
    if not found:
        raise MCQDataError(f"{name}: no saved DatasetDict folders (save_to_disk output, one per subject)")
    return found


def hf_subjects(layout: Layout, name: str, revision: str | None) -> list[str]:
    """A local directory's saved subjects, or the hub dataset's configurations that are subjects of the
    benchmark (cais/mmlu's "all" and "auxiliary_train" are not)."""
    from eval.subjects import subject_table

    if os.path.isdir(name):
        return _saved_subjects(name)
    import datasets

    known = subject_table(layout.name)
    return sorted(c for c in datasets.get_dataset_config_names(name, revision=revision) if c in known)


def detect_hf_layout(name: str) -> Layout:
    if os.path.isdir(name):
        first = _saved_subjects(name)[0]
        columns = set(next(iter(_hf_subject(name, None, first).values())).column_names)
        return LAYOUTS["mmlu" if "choices" in columns else "cmmlu" if "Question" in columns else "ceval"]
    lowered = name.lower()
    for benchmark in BENCHMARKS:  # "cmmlu" before "mmlu"
        if benchmark in lowered.replace("-", ""):
            return LAYOUTS[benchmark]
    raise MCQDataError(f"hf:{name}: cannot tell the benchmark from the name; pass --benchmark")


# --- one entry point ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Where the questions come from: a CSV root, or a Hugging Face dataset (hub name or local saved dir)."""
    layout: Layout
    location: str
    hf: bool = False
    revision: str | None = None

    def subjects(self, split: str | None = None) -> list[str]:
        if self.hf:
            return hf_subjects(self.layout, self.location, self.revision)
        return csv_subjects(self.layout, self.location, split or self.layout.eval_split)

    def read(self, subject: str, split: str, need_answer: bool | None = None) -> list[Question]:
        self.layout.check_split(split)
        if need_answer is None:
            need_answer = split != "test" or self.layout.test_answers
        if self.hf:
            return read_hf_split(self.layout, self.location, self.revision, subject, split, need_answer)
        return read_csv_split(self.layout, self.location, subject, split, need_answer)


def open_source(data: str | Source, benchmark: str | None = None) -> Source:
    """`DIR` (official CSVs) or `hf:NAME[@REVISION]`; `benchmark` None: detected from the layout or name."""
    if isinstance(data, Source):
        return data
    if benchmark is not None and benchmark not in LAYOUTS:
        raise MCQDataError(f"benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    if data.startswith("hf:"):
        name, _, revision = data[3:].partition("@")
        layout = LAYOUTS[benchmark] if benchmark else detect_hf_layout(name)
        return Source(layout, name, hf=True, revision=revision or None)
    if not os.path.isdir(data):
        raise MCQDataError(f"{data}: no such directory")
    return Source(LAYOUTS[benchmark] if benchmark else detect_csv_layout(data), data)
