"""eval mcq against the reference: prompts written here from Chinese-Mixtral's evaluators (DESIGN.md's C-Eval
rules, which its CMMLU script shares; its MMLU script's format_example/gen_prompt), each benchmark's official
file layout written by the tests (and the same rows as Hugging Face datasets saved to disk), predictions from
transformers' MixtralForCausalLM logits of the bundled tiny model (vocab 32000) with the real Mixtral tokenizer
loaded by transformers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from eval import mcq
from mixtral_jax.assets import TINY_MODEL_DIR
from tests.helpers.tokenizers import hf_tokenizer_dir

SUBJECTS = ("computer_network", "high_school_physics")

DEV = {
    "computer_network": [
        ("0", "在OSI参考模型中，负责路由选择的是____。", "物理层", "数据链路层", "网络层", "传输层", "C", "路由在网络层。"),
        ("1", "TCP协议属于____。", "应用层", "传输层", "网络层", "会话层", "B", "TCP是传输层协议。"),
        ("2", "以下哪个是私有IP地址？", "8.8.8.8", "192.168.1.1", "1.1.1.1", "114.114.114.114", "B", ""),
        ("3", "HTTP默认端口号是____。", "21", "25", "80", "443", "C", "HTTP使用80端口。"),
        ("4", "以太网使用的介质访问控制方法是____。", "CSMA/CD", "令牌环", "FDMA", "TDMA", "A", "以太网用CSMA/CD。"),
    ],
    "high_school_physics": [
        ("0", "牛顿第一定律又称为____。", "惯性定律", "加速度定律", "作用力定律", "万有引力定律", "A", ""),
        ("1", "光在真空中的速度约为____。", "3×10^5 m/s", "3×10^8 m/s", "3×10^6 km/s", "340 m/s", "B", "约3×10^8 m/s。"),
        ("2", "下列属于矢量的是____。", "质量", "时间", "速度", "温度", "C", "速度有方向。"),
        ("3", "电阻的国际单位是____。", "安培", "伏特", "瓦特", "欧姆", "D", "欧姆。"),
        ("4", "自由落体运动的加速度约为____。", "9.8 m/s²", "1 m/s²", "0", "98 m/s²", "A", "g约为9.8。"),
    ],
}
VAL = {
    "computer_network": [
        ("0", "DNS的主要功能是____。", "域名解析", "文件传输", "邮件发送", "远程登录", "A"),
        ("1", "IPv4地址的长度是____位。", "16", "32", "64", "128", "B"),
        ("2", "下列设备工作在数据链路层的是____，\n请选择。", "集线器", "交换机", "路由器", "网关", "B"),
        ("3", "UDP与TCP相比，特点是____。", "面向连接", "可靠传输", "无连接", "流量控制", "C"),
    ],
    "high_school_physics": [
        ("0", "功的单位是____。", "牛顿", "焦耳", "帕斯卡", "赫兹", "B"),
        ("1", "一个物体做匀速直线运动，其所受合力____。", "为零", "不为零", "方向与速度相同", "方向与速度相反", "A"),
        ("2", "下列现象中属于光的折射的是____。", "小孔成像", "水中倒影", "筷子在水中“折断”", "影子", "C"),
        ("3", "声音不能在____中传播。", "空气", "水", "钢铁", "真空", "D"),
    ],
}


# MMLU: English rows (question, A, B, C, D, answer), the last subject's name has several words
MMLU_SUBJECTS = ("astronomy", "high_school_world_history")
MMLU_DEV = {
    "astronomy": [("What is the closest star to Earth?", "Sirius", "The Sun", "Vega", "Polaris", "B"),
                  ("Which planet is the largest?", "Earth", "Mars", "Jupiter", "Venus", "C"),
                  ("A light-year measures", "time", "distance", "speed", "mass", "B"),
                  ("The Moon orbits", "Mars", "the Sun only", "Earth", "Jupiter", "C"),
                  ("Saturn is known for its", "rings", "oceans", "volcanoes", "moons only", "A")],
    "high_school_world_history": [("The Great Wall was built mainly in", "China", "Egypt", "Peru", "Italy", "A"),
                                  ("Who was the first Roman emperor?", "Nero", "Caesar", "Augustus", "Trajan", "C"),
                                  ("The printing press spread in Europe after", "1100", "1450", "1700", "1900",
                                   "B"),
                                  ("The Silk Road linked", "Asia and Europe", "the Americas", "Antarctica", "none",
                                   "A"),
                                  ("The French Revolution began in", "1689", "1776", "1789", "1848", "C")],
}
MMLU_VAL = {
    "astronomy": [("How many planets are in the Solar System?", "7", "8", "9", "10", "B"),
                  ("Which planet is called the red planet?", "Venus", "Mercury", "Mars", "Neptune", "C"),
                  ("What causes the seasons on Earth?", "distance to the Sun", "axial tilt", "the Moon",
                   "solar flares", "B")],
    "high_school_world_history": [("The Ming dynasty ruled", "Japan", "China", "Korea", "India", "B"),
                                  ("Magna Carta was sealed in", "1066", "1215", "1492", "1603", "B"),
                                  ("The Cold War ended around", "1945", "1962", "1991", "2001", "C")],
}
CMMLU_SUBJECTS = ("chinese_history", "high_school_physics")  # China specific, STEM


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_fixture(root, benchmark="ceval"):
    """The benchmark's official layout: C-Eval `{split}/{s}_{split}.csv` with `id,question,...`; CMMLU
    `{dev,test}/{s}.csv` with `,Question,A,B,C,D,Answer` (row index first); MMLU without a header."""
    if benchmark == "ceval":
        for split, table, header in (("dev", DEV, ["id", "question", "A", "B", "C", "D", "answer", "explanation"]),
                                     ("val", VAL, ["id", "question", "A", "B", "C", "D", "answer"])):
            for subject, rows in table.items():
                _write_csv(root / split / f"{subject}_{split}.csv", header, rows)
    elif benchmark == "cmmlu":  # C-Eval's rows under CMMLU's subject names
        for split, table in (("dev", DEV), ("test", VAL)):
            for subject, rows in zip(CMMLU_SUBJECTS, table.values()):
                _write_csv(root / split / f"{subject}.csv", ["", "Question", "A", "B", "C", "D", "Answer"],
                           [(i, *r[1:7]) for i, r in enumerate(rows)])
    else:
        for split, table in (("dev", MMLU_DEV), ("val", MMLU_VAL), ("test", MMLU_VAL)):
            for subject, rows in table.items():
                _write_csv(root / split / f"{subject}_{split}.csv", None, rows)
    return str(root)


def save_hf_fixture(root, benchmark):
    """The same rows as the Hugging Face datasets publish them (one DatasetDict per subject, save_to_disk):
    ceval/ceval-exam and haonan-li/cmmlu with their CSV columns, cais/mmlu with question/subject/choices/answer."""
    from datasets import Dataset, DatasetDict

    def rows_to(subject, subject_rows):
        if benchmark == "mmlu":
            return Dataset.from_dict({"question": [r[0] for r in subject_rows],
                                      "subject": [subject] * len(subject_rows),
                                      "choices": [list(r[1:5]) for r in subject_rows],
                                      "answer": ["ABCD".index(r[5]) for r in subject_rows]})
        keys = ("id", "question", "A", "B", "C", "D", "answer") if benchmark == "ceval" else \
            ("Question", "A", "B", "C", "D", "Answer")
        rows = [r[:7] if benchmark == "ceval" else r[1:7] for r in subject_rows]
        return Dataset.from_dict({k: [int(r[0]) if k == "id" else r[i] for r in rows] for i, k in enumerate(keys)})

    if benchmark == "mmlu":
        splits, subjects = {"dev": MMLU_DEV, "validation": MMLU_VAL, "test": MMLU_VAL}, MMLU_SUBJECTS
    else:
        subjects = SUBJECTS if benchmark == "ceval" else CMMLU_SUBJECTS
        splits = {"dev": DEV, ("val" if benchmark == "ceval" else "test"): VAL}
    for name, source in zip(subjects, SUBJECTS if benchmark != "mmlu" else MMLU_SUBJECTS):
        DatasetDict({split: rows_to(name, table[source]) for split, table in splits.items()}).save_to_disk(
            str(root / name))
    return str(root)


# --- the reference, written from DESIGN.md ---------------------------------------------------------------

def ref_example(row, with_answer):
    text = row[1] + "\nA. " + row[2] + "\nB. " + row[3] + "\nC. " + row[4] + "\nD. " + row[5]
    return text + ("\n答案：" + row[6] + "\n\n" if with_answer else "\n答案：")


def ref_prompt(subject, row, shots, instruct, dev=None):
    """C-Eval's and CMMLU's (the two reference scripts build the same text); `dev` default: DEV[subject]."""
    dev = DEV[subject] if dev is None else dev
    header = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    question = ref_example(row, False)
    if instruct:
        question = "[INST] " + question + " [/INST]"
    if shots == 0:
        return question
    if not instruct:
        return header + "".join(ref_example(d, True) for d in dev[:shots]) + question
    history = "[INST] " + header + " [/INST]好的，我会结合" + subject + "相关知识回答"
    for d in dev[:shots]:
        history += "[INST] " + ref_example(d, False)[: -len("\n答案：")] + "\n答案： [/INST]" + d[6] + "\n"
    return history + question


def ref_mmlu_prompt(subject, row, shots):
    """scripts/mmlu/eval.py: format_subject, format_example and gen_prompt (header even at 0 shots)."""
    spelled = ""
    for entry in subject.split("_"):
        spelled += " " + entry

    def example(r, with_answer):
        text = r[0] + "".join("\n{}. {}".format(c, r[j + 1]) for j, c in enumerate("ABCD")) + "\nAnswer:"
        return text + (" {}\n\n".format(r[5]) if with_answer else "")

    header = "The following are multiple choice questions (with answers) about {}.\n\n".format(spelled)
    return header + "".join(example(d, True) for d in MMLU_DEV[subject][:shots]) + example(row, False)


def ref_prompts(benchmark, shots, instruct):
    """(subjects, [(subject, row index, answer)], prompts) of the fixture's evaluated split."""
    if benchmark == "mmlu":
        return MMLU_SUBJECTS, [(s, i, r[5]) for s in MMLU_SUBJECTS for i, r in enumerate(MMLU_VAL[s])], \
            [ref_mmlu_prompt(s, r, shots) for s in MMLU_SUBJECTS for r in MMLU_VAL[s]]
    names = SUBJECTS if benchmark == "ceval" else CMMLU_SUBJECTS
    keyed = list(zip(names, SUBJECTS))
    return names, [(n, i, r[6]) for n, s in keyed for i, r in enumerate(VAL[s])], \
        [ref_prompt(n, r, shots, instruct, DEV[s]) for n, s in keyed for r in VAL[s]]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("ceval"))


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    return {b: write_fixture(tmp_path_factory.mktemp(b), b) for b in ("ceval", "cmmlu", "mmlu")}


@pytest.mark.parametrize("shots,instruct", [(0, False), (5, False), (0, True), (5, True), (2, False)])
def test_prompts_byte_identical_to_reference(data_dir, shots, instruct):
    questions, texts = mcq.build_prompts(data_dir, SUBJECTS, shots, instruct)
    expected = [ref_prompt(s, row, shots, instruct) for s in SUBJECTS for row in VAL[s]]
    assert [t.encode() for t in texts] == [e.encode() for e in expected]
    assert [(q.subject, q.row, q.answer) for q in questions] == [(s, i, r[6]) for s in SUBJECTS
                                                                  for i, r in enumerate(VAL[s])]
    if shots == 5 and not instruct:  # spot-check the literal layout once
        assert texts[0].startswith("以下是中国关于computer_network考试的单项选择题，请选出其中的正确答案。\n\n"
                                   "在OSI参考模型中，负责路由选择的是____。\nA. 物理层\nB. 数据链路层\nC. 网络层\n"
                                   "D. 传输层\n答案：C\n\nTCP协议属于")
        assert texts[0].endswith("DNS的主要功能是____。\nA. 域名解析\nB. 文件传输\nC. 邮件发送\nD. 远程登录\n答案：")


@pytest.mark.parametrize("benchmark,shots,instruct", [("cmmlu", 0, False), ("cmmlu", 5, False), ("cmmlu", 5, True),
                                                     ("mmlu", 0, False), ("mmlu", 5, False), ("mmlu", 3, False)])
def test_cmmlu_mmlu_prompts_byte_identical_to_reference(data_dirs, benchmark, shots, instruct):
    source = mcq.open_source(data_dirs[benchmark])  # detected from the layout
    assert (source.layout.name, source.layout.eval_split) == (benchmark, {"cmmlu": "test", "mmlu": "val"}[benchmark])
    subjects, keys, expected = ref_prompts(benchmark, shots, instruct)
    assert source.subjects() == list(subjects)
    questions, texts = mcq.build_prompts(data_dirs[benchmark], None, shots, instruct)
    assert [t.encode() for t in texts] == [e.encode() for e in expected]
    assert [(q.subject, q.row, q.answer) for q in questions] == keys
    if benchmark == "mmlu" and shots == 5:  # the literal layout once, double space included
        assert texts[3].startswith("The following are multiple choice questions (with answers) about  high school "
                                   "world history.\n\nThe Great Wall was built mainly in\nA. China\nB. Egypt\n"
                                   "C. Peru\nD. Italy\nAnswer: A\n\nWho was")
        assert texts[3].endswith("\n\nThe Ming dynasty ruled\nA. Japan\nB. China\nC. Korea\nD. India\nAnswer:")
    if benchmark == "cmmlu" and shots == 5 and not instruct:
        assert texts[0].startswith("以下是中国关于chinese_history考试的单项选择题，请选出其中的正确答案。\n\n在OSI")


def test_mmlu_has_no_instruct_format(data_dirs):
    with pytest.raises(ValueError, match="MMLU's reference evaluator has no instruct format"):
        mcq.build_prompts(data_dirs["mmlu"], None, 0, True)


@pytest.mark.parametrize("benchmark", ["ceval", "cmmlu", "mmlu"])
def test_hf_datasets_give_the_csv_questions(data_dirs, tmp_path, benchmark):
    """`hf:DIR` with the Hub datasets' columns (saved locally: the tests cannot reach the Hub) gives the same
    questions and prompts as the official CSVs; the benchmark is detected from the columns."""
    hf_dir = save_hf_fixture(tmp_path, benchmark)
    source = mcq.open_source("hf:" + hf_dir)
    assert source.hf and source.layout.name == benchmark
    for shots in (0, 5):
        assert mcq.build_prompts(source, None, shots, False) == mcq.build_prompts(data_dirs[benchmark], None, shots,
                                                                                  False)


def test_layout_detection_and_explicit_benchmark(data_dirs, tmp_path):
    with pytest.raises(mcq.MCQDataError, match=r"cmmlu0/test: no \*_test\.csv files"):  # the layout named
        mcq.build_prompts(data_dirs["cmmlu"], None, 0, False, benchmark="ceval", split="test")
    with pytest.raises(mcq.MCQDataError, match=r"astronomy_test\.csv: line 1: missing column\(s\) Question"):
        mcq.build_prompts(data_dirs["mmlu"], ["astronomy_test"], 0, False, benchmark="cmmlu", split="test")
    with pytest.raises(mcq.MCQDataError, match="cmmlu has no split 'val'"):
        mcq.build_prompts(data_dirs["cmmlu"], None, 0, False, split="val")
    with pytest.raises(mcq.MCQDataError, match="no dev/, val/ or test/ folder"):
        mcq.open_source(str(tmp_path))
    with pytest.raises(mcq.MCQDataError, match="cannot tell the benchmark"):
        mcq.open_source("hf:someone/exams")
    assert mcq.open_source("hf:haonan-li/cmmlu@refs/convert/parquet").revision == "refs/convert/parquet"
    assert mcq.open_source("hf:cais/mmlu").layout.name == "mmlu"


# --- predictions against transformers --------------------------------------------------------------------

def load_hf_tokenizer(directory):
    """The real Mixtral tokenizer as transformers loads it (shared with test_eval_harness.py)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir(directory))
    assert len(tok) == 32000
    return tok


def load_models():
    """(ours, transformers') bundled tiny model in fp32 (shared with test_eval_harness.py)."""
    from transformers import MixtralForCausalLM

    from mixtral_jax import from_pretrained

    theirs = MixtralForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    ours = from_pretrained(TINY_MODEL_DIR, dtype="float32")
    return ours, theirs


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return load_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="module")
def models():
    return load_models()


def reference_scores(model, tok, prompts, penalty=1.0, benchmark="ceval"):
    """The reference evaluator's rule on transformers' last-position logits, prompt by prompt (no padding):
    C-Eval/CMMLU logit("▁X") + logit("X"); MMLU logit of `tok("X").input_ids[-1]`."""
    from transformers import RepetitionPenaltyLogitsProcessor

    if benchmark == "mmlu":
        spaced, bare = [tok(x).input_ids[-1] for x in "ABCD"], []
    else:
        spaced = [tok.encode(x, add_special_tokens=False)[0] for x in "ABCD"]
        bare = [tok.encode("：" + x)[-1] for x in "ABCD"]
    ids, scores = [], []
    for text in prompts:
        input_ids = tok(text, return_tensors="pt")["input_ids"]
        ids.append(input_ids[0].tolist())
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits[:, -1].float()
        if penalty != 1.0:
            logits = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits)
        logits = logits[0]
        scores.append((logits[spaced] + logits[bare]).numpy() if bare else logits[spaced].numpy())
    return ids, np.stack(scores), spaced, bare


EXPECTED_CATEGORIES = {"ceval": {"STEM": SUBJECTS}, "cmmlu": {"China specific": ("chinese_history",),
                                                             "STEM": ("high_school_physics",)},
                       "mmlu": {"STEM": ("astronomy",), "humanities": ("high_school_world_history",)}}


@pytest.mark.slow
@pytest.mark.parametrize("benchmark,shots,instruct", [("ceval", 0, False), ("ceval", 5, False), ("ceval", 5, True),
                                                     ("cmmlu", 5, True), ("mmlu", 0, False), ("mmlu", 5, False)])
def test_predictions_match_transformers(data_dirs, models, hf_tokenizer, benchmark, shots, instruct):
    from mixtral_jax.data.tokenizer import load_tokenizer

    ours, theirs = models
    tokenizer = load_tokenizer(None)
    result = mcq.evaluate(ours, tokenizer, data_dirs[benchmark], shots, instruct, batch=3, pad_multiple=64)
    _, texts = mcq.build_prompts(data_dirs[benchmark], None, shots, instruct)
    ref_ids, ref_scores, spaced, bare = reference_scores(theirs, hf_tokenizer, texts, benchmark=benchmark)

    assert result["benchmark"] == benchmark
    assert result["choice_ids"] == {"spaced": spaced, "bare": bare}
    assert [hf_tokenizer.convert_ids_to_tokens(i) for i in spaced] == ["▁A", "▁B", "▁C", "▁D"]
    assert [hf_tokenizer.convert_ids_to_tokens(i) for i in bare] == ([] if benchmark == "mmlu" else list("ABCD"))
    assert [tokenizer.encode(t) for t in texts] == ref_ids  # BOS + the same pieces
    ours_scores = np.array([p["scores"] for p in result["predictions"]])
    np.testing.assert_allclose(ours_scores, ref_scores, atol=1e-4, rtol=0)
    ref_letters = ["ABCD"[i] for i in ref_scores.argmax(-1)]
    assert [p["predicted"] for p in result["predictions"]] == ref_letters
    top2 = np.sort(ref_scores, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # no near-tie that the tolerance could flip

    if benchmark == "ceval" and shots == 5:
        # the reference run's generate() scores carried a repetition penalty of 1.1: same rule, same letters
        _, pen_scores, _, _ = reference_scores(theirs, hf_tokenizer, texts, penalty=1.1)
        ids = [tokenizer.encode(t) for t in texts]
        raw = mcq.candidate_logits(ours, ids, spaced + bare, batch=8, pad_multiple=128)
        np.testing.assert_allclose(mcq.option_scores(raw, ids, spaced + bare, 1.1), pen_scores, atol=1e-4, rtol=0)

    # (c) the summary agrees with the predictions, grouped as the benchmark's reference groups subjects
    preds = result["predictions"]
    subjects, keys, _ = ref_prompts(benchmark, shots, instruct)
    assert [(p["subject"], p["row"]) for p in preds] == [k[:2] for k in keys]
    for group, members in EXPECTED_CATEGORIES[benchmark].items():
        right = [p["predicted"] == p["answer"] for p in preds if p["subject"] in members]
        assert result["categories"][group] == {"correct": sum(right), "total": len(right),
                                               "accuracy": 100.0 * sum(right) / len(right)}
        for s in members:
            right = [p["predicted"] == p["answer"] for p in preds if p["subject"] == s]
            assert result["subjects"][s] == {"category": group, "correct": sum(right), "total": len(right),
                                             "accuracy": 100.0 * sum(right) / len(right)}
    right = sum(p["predicted"] == p["answer"] for p in preds)
    assert (result["correct"], result["total"], result["overall"]) == (right, len(preds), 100.0 * right / len(preds))
    assert set(result["categories"]) == set(EXPECTED_CATEGORIES[benchmark])


def test_summary_categories_and_micro_average():
    preds = ([{"subject": "law", "predicted": "A", "answer": "A"}] * 3
             + [{"subject": "law", "predicted": "B", "answer": "A"}]
             + [{"subject": "marxism", "predicted": "C", "answer": "C"}]
             + [{"subject": "my_exam", "predicted": "C", "answer": "D"}] * 2
             + [{"subject": "my_exam", "predicted": "D", "answer": None}])  # unanswered: not counted
    s = mcq.summarize(preds)
    assert s["subjects"]["law"]["accuracy"] == 75.0 and s["subjects"]["my_exam"]["category"] == "Other"
    assert s["subjects"]["my_exam"]["total"] == 2
    assert s["categories"] == {"Social Science": {"correct": 1, "total": 1, "accuracy": 100.0},
                               "Humanities": {"correct": 3, "total": 4, "accuracy": 75.0},
                               "Other": {"correct": 0, "total": 2, "accuracy": 0.0}}
    assert s["overall"] == pytest.approx(100 * 4 / 7)  # micro: not the mean of the subject accuracies


def test_bucket_batches_fixed_shapes():
    batches = mcq.bucket_batches([5, 70, 64, 130, 3, 65, 1], batch=2, pad_multiple=64)
    assert batches == [(64, [6, 4]), (64, [0, 2]), (128, [5, 1]), (192, [3])]


def test_bucket_batches_compute_no_more_than_filling_each_width_alone():
    """Every prompt in exactly one batch of at most `batch`, wide enough for it; the rows computed (batch x
    width per call) never exceed filling each width's bucket on its own, and fall below it here."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, size=37).tolist()
    batches = mcq.bucket_batches(lengths, batch=8, pad_multiple=64)
    assert sorted(i for _, members in batches for i in members) == list(range(37))
    assert all(len(m) <= 8 and all(lengths[i] <= width and width % 64 == 0 for i in m) for width, m in batches)
    per_width: dict[int, int] = {}
    for n in lengths:
        width = 64 * -(-n // 64)
        per_width[width] = per_width.get(width, 0) + 1
    filled = sum(width * 8 * -(-count // 8) for width, count in per_width.items())
    assert sum(width * 8 for width, _ in batches) < filled


# --- bad input and the command line ------------------------------------------------------------------------

def test_malformed_csv_names_file_and_line(tmp_path):
    root = write_fixture(tmp_path)
    path = tmp_path / "val" / "high_school_physics_val.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[3] = lines[3].rstrip("\n") + ",extra\n"  # line 4 of the file
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(mcq.MCQDataError, match=r"high_school_physics_val\.csv: line 4: 8 fields, expected 7"):
        mcq.build_prompts(root, SUBJECTS, 0, False)

    path = tmp_path / "val" / "computer_network_val.csv"  # a quoted newline in line 4-5; the bad answer after it
    text = path.read_text(encoding="utf-8").replace("无连接,流量控制,C", "无连接,流量控制,E")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(mcq.MCQDataError, match=r"computer_network_val\.csv: line 6: field 'answer' is 'E'"):
        mcq.build_prompts(root, SUBJECTS, 0, False)

    (tmp_path / "dev" / "high_school_physics_dev.csv").write_text("id,question,A,B,C\n1,q,a,b,c\n")
    with pytest.raises(mcq.MCQDataError, match=r"high_school_physics_dev\.csv: line 1: missing column\(s\) D, "):
        mcq.build_prompts(root, ["high_school_physics"], 5, False)


@pytest.mark.slow
def test_cli_writes_json_and_table(tmp_path, capsys):
    from mixtral_jax.cli.main import main

    root = write_fixture(tmp_path / "data")
    out = tmp_path / "res" / "ceval.json"
    assert main(["eval", "mcq", "--model", TINY_MODEL_DIR, "--data", root, "--shots", "0", "--dtype", "float32",
                 "--subjects", "computer_network", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["total"] == 4 and set(result["subjects"]) == {"computer_network"}
    assert [p["row"] for p in result["predictions"]] == [0, 1, 2, 3]
    assert {"subject", "row", "predicted", "answer"} <= set(result["predictions"][0])
    table = capsys.readouterr().out
    assert "| computer_network | STEM |" in table and "| **overall** |" in table
    assert sorted(p.name for p in out.parent.iterdir()) == ["ceval.json"]  # no temporary left behind
    assert result["attention_chunk"] == 1024

    chunked_out = tmp_path / "chunked" / "ceval.json"  # prompts attended 8 queries at a time: the same answers
    assert main(["eval", "mcq", "--model", TINY_MODEL_DIR, "--data", root, "--shots", "0", "--dtype", "float32",
                 "--subjects", "computer_network", "--attention-chunk", "8", "--out", str(chunked_out),
                 "--quiet"]) == 0
    chunked = json.loads(chunked_out.read_text(encoding="utf-8"))
    assert chunked["attention_chunk"] == 8 and chunked["prompt_tokens"] > 4 * 8
    assert [p["predicted"] for p in chunked["predictions"]] == [p["predicted"] for p in result["predictions"]]
    np.testing.assert_allclose([p["scores"] for p in chunked["predictions"]],
                               [p["scores"] for p in result["predictions"]], atol=1e-4, rtol=0)

    cmmlu_out = tmp_path / "res" / "cmmlu.json"  # CMMLU's layout, detected; its test split and groups
    assert main(["eval", "mcq", "--model", TINY_MODEL_DIR, "--data", write_fixture(tmp_path / "cmmlu", "cmmlu"),
                 "--shots", "0", "--dtype", "float32", "--out", str(cmmlu_out), "--quiet"]) == 0
    cmmlu = json.loads(cmmlu_out.read_text(encoding="utf-8"))
    assert (cmmlu["benchmark"], cmmlu["split"], cmmlu["total"]) == ("cmmlu", "test", 8)
    assert set(cmmlu["categories"]) == {"China specific", "STEM"} and cmmlu["predictions"][0]["id"] is None
    assert "| chinese_history | China specific |" in capsys.readouterr().out

    (tmp_path / "data" / "val" / "computer_network_val.csv").write_text("id,question,A,B,C,D,answer\n1,q,a,b\n")
    assert main(["eval", "mcq", "--model", TINY_MODEL_DIR, "--data", root, "--shots", "0",
                 "--subjects", "computer_network", "--quiet"]) == 2
    assert "computer_network_val.csv: line 2: 4 fields, expected 7" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_candidate_logits_equal_full_forward(models, tied):
    """The narrowed LM head (untied) and the gather from full logits (tied) give the full forward's values,
    whatever the padding and the bucket."""
    from flax import nnx

    from mixtral_jax import Mixtral, MixtralConfig

    model = models[0]
    if tied:
        model = Mixtral(MixtralConfig.from_hf(TINY_MODEL_DIR, dtype="float32", param_dtype="float32",
                                              tie_word_embeddings=True), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 32000, n)] for n in (5, 17, 70, 3)]
    cands = [330, 28705, 365, 334, 28741, 28760, 28743, 28757]
    got = mcq.candidate_logits(model, prompts, cands, batch=3, pad_multiple=16)
    ids, mask = np.zeros((4, 80), np.int32), np.zeros((4, 80), bool)  # one full forward, another padding width
    for r, p in enumerate(prompts):
        ids[r, 80 - len(p):], mask[r, 80 - len(p):] = p, True
    full = np.asarray(nnx.jit(lambda m, i, a: m(i, a).logits[:, -1])(model, ids, mask))
    np.testing.assert_allclose(got, full[:, cands], atol=1e-5, rtol=0)


def test_cells_read_as_the_reference_pandas_reads_them(tmp_path):
    """The reference read the CSVs with pandas: an all-numeric option column prints as floats, NA-like cells as
    'nan'. The prompts keep those quirks (they are what the published numbers were measured on)."""
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "x_val.csv").write_text(
        "id,question,A,B,C,D,answer\n0,q1,1.50,2,NA,None,A\n1,q2,3,4,c,d,B\n", encoding="utf-8")
    questions = mcq.read_split(str(tmp_path), "x", "val")
    assert [q.options for q in questions] == [("1.5", "2", "nan", "nan"), ("3.0", "4", "c", "d")]


@pytest.mark.parametrize("benchmark", ["ceval", "mmlu"])
def test_a_split_with_no_questions_is_refused_naming_the_file(tmp_path, capsys, benchmark):
    """A header and no rows (or an empty MMLU file) is not "overall 0/0": the file is named, exit 2."""
    from mixtral_jax.cli.main import main

    root = write_fixture(tmp_path / "data", benchmark)
    subject = SUBJECTS[0] if benchmark == "ceval" else MMLU_SUBJECTS[0]
    path = tmp_path / "data" / "val" / f"{subject}_val.csv"
    path.write_text("id,question,A,B,C,D,answer\n" if benchmark == "ceval" else "", encoding="utf-8")
    with pytest.raises(mcq.MCQDataError, match=rf"{subject}_val\.csv: no questions"):
        mcq.build_prompts(root, [subject], 0, False)
    assert main(["eval", "mcq", "--model", TINY_MODEL_DIR, "--data", root, "--shots", "0", "--subjects", subject,
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: no questions" in err and err.count("\n") == 1
    with pytest.raises(mcq.MCQDataError, match="no questions to evaluate"):
        mcq.evaluate(None, None, root, prepared=([], []))
