"""Multiple-choice exams (C-Eval, CMMLU, MMLU) scored as Chinese-Mixtral's evaluators score them.

Data: see mcq_data.py (each benchmark's official CSV layout, or Hugging Face datasets).

Prompts, byte for byte as the reference scripts build them:
* C-Eval and CMMLU (scripts/ceval and scripts/cmmlu, the same code): `format_example`, `few_shot_history` and
  `build_prompt` below are the reference's `format_example`, `generate_mixtral_few_shot_prompt` /
  `generate_few_shot_noprompt`, `generate_mixtral_inst_few_shot_prompt` / `generate_few_shot_prompt` and its
  question template. 0-shot: the question alone, no header. `--instruct` wraps turns in `[INST] ... [/INST]`.
* MMLU (scripts/mmlu, after Baichuan's evaluate_mmlu.py): `format_example_en` and `mmlu_history` are its
  `format_example` and `gen_prompt`; the header is written even at 0 shots, and the subject is spelled as its
  `format_subject` spells it (each word preceded by a space, hence two spaces after "about").

Score of option X: C-Eval/CMMLU: the next-token logit of `encode("X")[0]` (no special tokens: the piece "▁X")
plus that of `encode("：X")[-1]` (the bare piece "X"); MMLU: the logit of `encode("X")[-1]` ("▁X") alone (the
reference takes a softmax over the four first, which does not change the argmax). The prediction is the argmax
(the first on a tie). The C-Eval/CMMLU reference read its logits from `generate(...).scores`, which its
sampling config had passed through a repetition penalty of 1.1; `repetition_penalty` reproduces that (default
1.0: the raw logits, as DESIGN.md states the rule). Overall accuracy = all correct / all questions in every
benchmark (the references' micro averages); categories as each reference groups subjects (subjects.py).

Batched: prompts are sorted by length and cut into runs of at most `batch` neighbours, each left-padded to its
longest rounded up to a multiple of `pad_multiple` (the cuts chosen to compute the fewest padded tokens), so
each (batch, width) shape compiles once; the logits are read at the last position.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.mcq_data import LETTERS, MCQDataError, Question, Source, open_source
from eval.report import write_json
from eval.subjects import category_names, category_of


def read_split(data: str | Source, subject: str, split: str, need_answer: bool | None = None,
               benchmark: str | None = None) -> list[Question]:
    """The questions of one subject's split, cells as the reference's `pd.read_csv` gives them."""
    return open_source(data, benchmark).read(subject, split, need_answer)


# --- prompts (the references', byte for byte) -------------------------------------------------------------

def format_example(q: Question, include_answer: bool) -> str:
    example = q.question
    for letter, option in zip(LETTERS, q.options):
        example += f"\n{letter}. {option}"
    if include_answer:
        return example + "\n答案：" + q.answer + "\n\n"
    return example + "\n答案："


def _check_shots(subject: str, dev: Sequence[Question], shots: int) -> None:
    if shots > len(dev):
        raise MCQDataError(f"{subject}: {shots} shots asked, the dev split has {len(dev)} questions")


def few_shot_history(subject: str, dev: Sequence[Question], shots: int, instruct: bool) -> str:
    if shots == 0:
        return ""
    _check_shots(subject, dev, shots)
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


def format_example_en(q: Question, include_answer: bool) -> str:
    prompt = q.question + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options))
    return prompt + "\nAnswer:" + (f" {q.answer}\n\n" if include_answer else "")


def mmlu_history(subject: str, dev: Sequence[Question], shots: int) -> str:
    _check_shots(subject, dev, shots)
    spelled = "".join(" " + word for word in subject.split("_"))
    header = f"The following are multiple choice questions (with answers) about {spelled}.\n\n"
    return header + "".join(format_example_en(q, include_answer=True) for q in dev[:shots])


def build_prompts(data: str | Source, subjects: Sequence[str] | None, shots: int, instruct: bool,
                  split: str | None = None, benchmark: str | None = None) -> tuple[list[Question], list[str]]:
    """(questions, prompts) of the subjects' `split` (default: the benchmark's evaluated split)."""
    source = open_source(data, benchmark)
    english = source.layout.name == "mmlu"
    if english and instruct:
        raise ValueError("--instruct: MMLU's reference evaluator has no instruct format")
    split = split or source.layout.eval_split
    source.layout.check_split(split)
    questions, texts = [], []
    subjects = list(subjects or source.subjects(split))
    for subject in subjects:
        dev = source.read(subject, "dev", need_answer=True) if shots else []
        history = mmlu_history(subject, dev, shots) if english else few_shot_history(subject, dev, shots, instruct)
        for q in source.read(subject, split):
            questions.append(q)
            texts.append(history + format_example_en(q, False) if english else build_prompt(q, history, instruct))
    if not questions:
        raise MCQDataError(f"{source.location}: no questions in the {split} split of "
                           f"{', '.join(subjects) or 'no subject'}")
    return questions, texts


# --- scoring ------------------------------------------------------------------------------------------------

def choice_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(ids of "▁A".."▁D", ids of bare "A".."D") as the C-Eval/CMMLU reference takes them from its tokenizer."""
    spaced = [tokenizer.encode(x, add_bos=False)[0] for x in LETTERS]
    bare = [tokenizer.encode("：" + x)[-1] for x in LETTERS]
    return spaced, bare


def candidate_ids(tokenizer, benchmark: str) -> list[int]:
    """The ids whose logits make the option scores: "▁X" then "X" (C-Eval, CMMLU), or MMLU's
    `tokenizer("X").input_ids[-1]` ("▁X") only."""
    if benchmark == "mmlu":
        return [tokenizer.encode(x)[-1] for x in LETTERS]
    spaced, bare = choice_ids(tokenizer)
    return spaced + bare


@partial(jax.jit, static_argnames=("graphdef",))
def _candidate_logits(graphdef, state, input_ids, attention_mask, candidates):
    """Only the candidates' columns of the head at the last position: [B, 8] logits instead of [B, T, vocab]
    (XLA does not narrow the head by itself; on small models that head is most of the work and the memory)."""
    model = nnx.merge(graphdef, state)
    last = model(input_ids, attention_mask, return_hidden=True).hidden_states[:, -1]  # left padding
    return jnp.einsum("bd,dc->bc", last, model.output_head()[:, candidates]).astype(jnp.float32)


def bucket_batches(lengths: Sequence[int], batch: int, pad_multiple: int) -> list[tuple[int, list[int]]]:
    """(padded width, prompt indices) per batch: the prompts sorted by length, cut into runs of at most `batch`
    neighbours, a run's width its longest rounded up to pad_multiple. Every call computes `batch` rows (a fixed
    shape per width), so the cuts minimise the sum of the widths, then the number of calls (dynamic programming
    over the sorted order). Filling each width's bucket separately instead leaves a part-empty batch in every
    bucket: 1.55x the prompt tokens computed on a 64-question run, 2.7x on 16 (bench/bench_eval.py)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    widths = [pad_multiple * math.ceil(lengths[i] / pad_multiple) for i in order]
    best: list[tuple[int, int]] = [(0, 0)]  # best[end]: (sum of widths, calls) of the first `end` prompts
    cut = [0]
    for end in range(1, len(order) + 1):
        options = [((best[s][0] + widths[end - 1], best[s][1] + 1), s) for s in range(max(0, end - batch), end)]
        cost, start = min(options, key=lambda o: (o[0], -o[1]))  # ties: the shorter last run
        best.append(cost)
        cut.append(start)
    batches, end = [], len(order)
    while end:
        batches.append((widths[end - 1], order[cut[end]: end]))
        end = cut[end]
    return batches[::-1]


def left_padded(seqs: Sequence[Sequence[int]], members: Sequence[int], batch: int, width: int,
                pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask [batch, width] of seqs[members], left-padded; rows past the members repeat the first one
    (a fixed batch shape: one compile per width)."""
    ids = np.full((batch, width), pad_id, np.int32)
    mask = np.zeros((batch, width), bool)
    for r, i in enumerate(list(members) + [members[0]] * (batch - len(members))):
        seq = seqs[i]
        ids[r, width - len(seq):], mask[r, width - len(seq):] = seq, True
    return ids, mask


def candidate_logits(model, prompts: Sequence[Sequence[int]], candidates: Sequence[int], batch: int = 8,
                     pad_multiple: int = 64, pad_id: int = 0, progress: bool = False) -> np.ndarray:
    """[len(prompts), len(candidates)] fp32: each prompt's next-token logits of the candidate ids."""
    from tqdm import tqdm

    graphdef, state = nnx.split(model)
    cand = jnp.asarray(candidates, jnp.int32)
    out = np.zeros((len(prompts), len(candidates)), np.float32)
    batches = bucket_batches([len(p) for p in prompts], batch, pad_multiple)
    for width, members in tqdm(batches, desc="mcq", unit="batch", disable=not progress):
        ids, mask = left_padded(prompts, members, batch, width, pad_id)
        logits = np.asarray(_candidate_logits(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cand))
        out[members] = logits[: len(members)]
    return out


def option_scores(logits: np.ndarray, prompts: Sequence[Sequence[int]], candidates: Sequence[int],
                  repetition_penalty: float = 1.0) -> np.ndarray:
    """[N, 4]: logit("▁X") + logit("X") for 8 candidates, the 4 logits themselves for 4; with a penalty,
    transformers' RepetitionPenaltyLogitsProcessor is applied first (ids present in the prompt: negative logits
    times p, positive ones divided by p)."""
    logits = logits.astype(np.float32).copy()
    if repetition_penalty != 1.0:
        for n, prompt in enumerate(prompts):
            present = set(prompt)
            for j, c in enumerate(candidates):
                if c in present:
                    v = logits[n, j]
                    logits[n, j] = v * repetition_penalty if v < 0 else v / repetition_penalty
    return logits[:, :4] + logits[:, 4:8] if logits.shape[1] == 8 else logits


# --- the evaluation -----------------------------------------------------------------------------------------

def _accuracy(correct: int, total: int) -> float | None:
    return 100.0 * correct / total if total else None


def summarize(predictions: Sequence[dict], benchmark: str = "ceval") -> dict:
    """overall (micro: all correct / all answered questions), per subject and per category, in percent."""
    subjects: dict[str, dict] = {}
    for p in predictions:
        s = subjects.setdefault(p["subject"], {"category": category_of(benchmark, p["subject"]), "correct": 0,
                                               "total": 0})
        if p["answer"] is not None:
            s["total"] += 1
            s["correct"] += int(p["predicted"] == p["answer"])
    categories = {c: {"correct": 0, "total": 0} for c in category_names(benchmark)}
    for s in subjects.values():
        categories[s["category"]]["correct"] += s["correct"]
        categories[s["category"]]["total"] += s["total"]
    for entry in [*subjects.values(), *categories.values()]:
        entry["accuracy"] = _accuracy(entry["correct"], entry["total"])
    correct = sum(s["correct"] for s in subjects.values())
    total = sum(s["total"] for s in subjects.values())
    return {"overall": _accuracy(correct, total), "correct": correct, "total": total,
            "subjects": subjects, "categories": {c: v for c, v in categories.items() if v["total"]}}


def evaluate(model, tokenizer, data: str | Source, shots: int = 5, instruct: bool = False,
             subjects: Sequence[str] | None = None, split: str | None = None, batch: int = 8,
             pad_multiple: int = 64, repetition_penalty: float = 1.0, progress: bool = False,
             prepared: tuple[list[Question], list[str]] | None = None, benchmark: str | None = None) -> dict:
    """`data`: a CSV root, `hf:NAME`, or an opened Source; `benchmark` None: detected from it.
    `prepared`: the (questions, prompts) of `build_prompts` for these arguments, if already built."""
    source = open_source(data, benchmark)
    split = split or source.layout.eval_split
    if prepared is None:
        prepared = build_prompts(source, subjects, shots, instruct, split)
    questions, texts = prepared
    if not questions:  # an accuracy over nothing is no result
        raise MCQDataError(f"{source.location}: no questions to evaluate")
    prompts = [tokenizer.encode(t) for t in texts]
    candidates = candidate_ids(tokenizer, source.layout.name)
    logits = candidate_logits(model, prompts, candidates, batch, pad_multiple,
                              pad_id=tokenizer.eos_id, progress=progress)
    scores = option_scores(logits, prompts, candidates, repetition_penalty)
    predictions = [{"subject": q.subject, "row": q.row, "id": q.id, "predicted": LETTERS[int(np.argmax(s))],
                    "answer": q.answer, "scores": [float(x) for x in s]} for q, s in zip(questions, scores)]
    summary = summarize(predictions, source.layout.name)
    return {"benchmark": source.layout.name, "split": split, "shots": shots, "instruct": instruct,
            "repetition_penalty": repetition_penalty, "questions": len(questions),
            "prompt_tokens": int(sum(len(p) for p in prompts)), **summary,
            "choice_ids": {"spaced": candidates[:4], "bare": candidates[4:]}, "predictions": predictions}


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

    from mixtral_jax.checkpoints.pretrained import from_pretrained
    from mixtral_jax.checkpoints.run_manifest import model_directory
    from mixtral_jax.data.tokenizer import check_compatible, load_tokenizer

    if args.shots < 0:
        raise ValueError(f"--shots {args.shots}: must be >= 0")
    source = open_source(args.data, args.benchmark)
    split = args.split or source.layout.eval_split
    source.layout.check_split(split)  # before listing the split's folder
    subjects = [s for s in args.subjects.split(",") if s] if args.subjects else source.subjects(split)
    prepared = build_prompts(source, subjects, args.shots, args.instruct, split)  # bad data: before the model
    tokenizer = load_tokenizer(args.tokenizer, model=model_directory(args.model))
    model = from_pretrained(args.model, dtype=args.dtype, moe_backend=args.moe_backend,
                            attention_chunk=args.attention_chunk or None, show_progress=not args.quiet)
    check_compatible(tokenizer, model.config.vocab_size, f"{args.model}/config.json")
    start = time.perf_counter()
    result = evaluate(model, tokenizer, source, args.shots, args.instruct, subjects, split, args.batch,
                      args.pad_multiple, args.repetition_penalty, progress=not args.quiet, prepared=prepared)
    seconds = time.perf_counter() - start
    result = {"model": args.model, "data": args.data, "tokenizer": tokenizer.path,
              "attention_chunk": model.config.attention_chunk, "seconds": round(seconds, 3),
              "tokens_per_s": round(result["prompt_tokens"] / seconds, 1), **result}
    if args.out:
        write_json(args.out, result)
    print(markdown_table(result))
    return 0
