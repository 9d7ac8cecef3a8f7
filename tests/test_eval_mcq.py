"""eval mcq against the reference: prompts written here from DESIGN.md's rules (Chinese-Mixtral's C-Eval
evaluator), predictions from transformers' MixtralForCausalLM logits of the bundled tiny model (vocab 32000)
with the real Mixtral tokenizer loaded by transformers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from eval import mcq
from mixtral_jax.assets import TINY_MODEL_DIR
from tests.test_train_data import _hf_dir

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


def write_fixture(root):
    for split, table, header in (("dev", DEV, ["id", "question", "A", "B", "C", "D", "answer", "explanation"]),
                                 ("val", VAL, ["id", "question", "A", "B", "C", "D", "answer"])):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in table.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
    return str(root)


# --- the reference, written from DESIGN.md ---------------------------------------------------------------

def ref_example(row, with_answer):
    text = row[1] + "\nA. " + row[2] + "\nB. " + row[3] + "\nC. " + row[4] + "\nD. " + row[5]
    return text + ("\n答案：" + row[6] + "\n\n" if with_answer else "\n答案：")


def ref_prompt(subject, row, shots, instruct):
    header = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    question = ref_example(row, False)
    if instruct:
        question = "[INST] " + question + " [/INST]"
    if shots == 0:
        return question
    if not instruct:
        return header + "".join(ref_example(d, True) for d in DEV[subject][:shots]) + question
    history = "[INST] " + header + " [/INST]好的，我会结合" + subject + "相关知识回答"
    for d in DEV[subject][:shots]:
        history += "[INST] " + ref_example(d, False)[: -len("\n答案：")] + "\n答案： [/INST]" + d[6] + "\n"
    return history + question


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("ceval"))


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


# --- predictions against transformers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_hf_dir(tmp_path_factory.mktemp("hf_tok")))
    assert len(tok) == 32000
    return tok


@pytest.fixture(scope="module")
def models():
    from transformers import MixtralForCausalLM

    from mixtral_jax import from_pretrained

    theirs = MixtralForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    ours = from_pretrained(TINY_MODEL_DIR, dtype="float32")
    return ours, theirs


def reference_scores(model, tok, prompts, penalty=1.0):
    """The reference evaluator's rule on transformers' last-position logits, prompt by prompt (no padding)."""
    from transformers import RepetitionPenaltyLogitsProcessor

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
        scores.append((logits[spaced] + logits[bare]).numpy())
    return ids, np.stack(scores), spaced, bare


@pytest.mark.parametrize("shots,instruct", [(0, False), (5, False), (5, True)])
def test_predictions_match_transformers(data_dir, models, hf_tokenizer, shots, instruct):
    from mixtral_jax.tokenizer import load_tokenizer

    ours, theirs = models
    tokenizer = load_tokenizer(None)
    result = mcq.evaluate(ours, tokenizer, data_dir, shots, instruct, SUBJECTS, batch=3, pad_multiple=64)
    _, texts = mcq.build_prompts(data_dir, SUBJECTS, shots, instruct)
    ref_ids, ref_scores, spaced, bare = reference_scores(theirs, hf_tokenizer, texts)

    assert result["choice_ids"] == {"spaced": spaced, "bare": bare}
    assert [hf_tokenizer.convert_ids_to_tokens(i) for i in spaced] == ["▁A", "▁B", "▁C", "▁D"]
    assert [hf_tokenizer.convert_ids_to_tokens(i) for i in bare] == ["A", "B", "C", "D"]
    assert [tokenizer.encode(t) for t in texts] == ref_ids  # BOS + the same pieces
    ours_scores = np.array([p["scores"] for p in result["predictions"]])
    np.testing.assert_allclose(ours_scores, ref_scores, atol=1e-4, rtol=0)
    ref_letters = ["ABCD"[i] for i in ref_scores.argmax(-1)]
    assert [p["predicted"] for p in result["predictions"]] == ref_letters
    top2 = np.sort(ref_scores, -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3  # no near-tie that the tolerance could flip

    # the reference run's generate() scores carried a repetition penalty of 1.1: same rule, same letters
    _, pen_scores, _, _ = reference_scores(theirs, hf_tokenizer, texts, penalty=1.1)
    ids = [tokenizer.encode(t) for t in texts]
    raw = mcq.candidate_logits(ours, ids, spaced + bare, batch=8, pad_multiple=128)
    np.testing.assert_allclose(mcq.option_scores(raw, ids, spaced + bare, 1.1), pen_scores, atol=1e-4, rtol=0)

    # (c) the summary agrees with the predictions
    preds = result["predictions"]
    assert [(p["subject"], p["row"]) for p in preds] == [(s, i) for s in SUBJECTS for i in range(4)]
    for s in SUBJECTS:
        right = sum(p["predicted"] == p["answer"] for p in preds if p["subject"] == s)
        assert result["subjects"][s] == {"category": "STEM", "correct": right, "total": 4,
                                         "accuracy": 100.0 * right / 4}
    right = sum(p["predicted"] == p["answer"] for p in preds)
    assert (result["correct"], result["total"], result["overall"]) == (right, 8, 100.0 * right / 8)
    assert result["categories"] == {"STEM": {"correct": right, "total": 8, "accuracy": 100.0 * right / 8}}


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


def test_cli_writes_json_and_table(tmp_path, capsys):
    from mixtral_jax.cli import main

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

    (tmp_path / "data" / "val" / "computer_network_val.csv").write_text("id,question,A,B,C,D,answer\n1,q,a,b\n")
    assert main(["eval", "mcq", "--model", TINY_MODEL_DIR, "--data", root, "--shots", "0",
                 "--subjects", "computer_network", "--quiet"]) == 2
    assert "computer_network_val.csv: line 2: 4 fields, expected 7" in capsys.readouterr().err


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
