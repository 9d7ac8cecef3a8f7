"""Tasks of documents for `data prepare`'s workers (mixtral_jax/data/text_pieces.py): whatever the sources and
however the file reads fall across lines, the tasks hold exactly read_texts' documents in order, `size` to a
task, with their bytes; a worker's decoding error names the file and line."""

from __future__ import annotations

import json

import pytest

from mixtral_jax.data import text_pieces
from mixtral_jax.data.texts import DataError, read_texts

AWKWARD_LINES = [
    "第一行", "", "two\r", "\r", "\r\r", "\rinner\r", " ", "长" * 40, "", "", "x", "\ry", "z\r\r", "", "末行",
]


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(AWKWARD_LINES) + "\n", encoding="utf-8", newline="")
    (tmp_path / "b.txt").write_text("无换行结尾\n\n" + "一二三\n" * 7 + "last, no newline", encoding="utf-8",
                                    newline="")
    (tmp_path / "blank.txt").write_text("\n\r\n\n", newline="")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["甲", "", "乙", "丙"]))
    return [str(tmp_path / "a.txt"), "bundled:hsk-english", str(tmp_path / "c.jsonl"), str(tmp_path / "*.txt")]


@pytest.mark.parametrize("read_bytes", [3, 7, 1 << 24])
@pytest.mark.parametrize("size", [1, 4, 9, 1000])
def test_tasks_hold_read_texts_documents_in_order(sources, monkeypatch, read_bytes, size):
    monkeypatch.setattr(text_pieces, "READ_BYTES", read_bytes)
    expected = [(i, text) for i, source in enumerate(sources) for text in read_texts(source)]
    tasks = list(text_pieces.tasks(sources, "text", size))
    got, counts = [], []
    for task in tasks:
        texts, sizes = text_pieces.read_pieces(task)
        counts.append(len(texts))
        for piece, piece_bytes in zip(task, sizes):
            piece_texts, _ = piece.read()
            assert piece_bytes == sum(len(t.encode("utf-8")) for t in piece_texts)
            got.extend((piece.source, text) for text in piece_texts)
    assert got == expected
    assert counts[:-1] == [size] * (len(counts) - 1) and 0 < counts[-1] <= size
    assert any(isinstance(piece, text_pieces.LineRange) for task in tasks for piece in task)


def test_a_workers_decoding_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("好\n".encode() * 5 + b"ok \xff\xfe\n" + b"fine\n")
    with pytest.raises(DataError, match=rf"{path}:6: not UTF-8 text \(invalid start byte at byte 3\)"):
        for task in text_pieces.tasks([str(path)], "text", 2):
            text_pieces.read_pieces(task)
    with pytest.raises(DataError, match=rf"{path}:6: not UTF-8"):  # the message read_texts gives
        list(read_texts(str(path)))
