"""Text sources (mixtral_jax/data/texts.py): files, directories and globs, local and on gs:// (an emulated bucket),
saved datasets, TensorFlow Datasets and the bundled corpora; errors name the file and the line."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from mixtral_jax.data.corpora import CorpusError
from mixtral_jax.data.sft import read_alpaca
from mixtral_jax.data.texts import DataError, read_texts
from tests.helpers.gcs_emulator import fake_gcs


def test_read_texts_files_directories_globs(tmp_path):
    (tmp_path / "b.txt").write_text("one\n\ntwo\r\n")
    (tmp_path / "a.jsonl").write_text('{"text": "甲"}\n\n{"text": "", "id": 2}\n{"text": "乙", "id": 3}\n')
    (tmp_path / "c.json").write_text(json.dumps([{"body": "x", "text": "丙"}]))
    (tmp_path / "notes.md").write_text("not data")
    assert list(read_texts(str(tmp_path / "b.txt"))) == ["one", "two"]
    assert list(read_texts(str(tmp_path))) == ["甲", "乙", "one", "two", "丙"]
    assert list(read_texts(str(tmp_path / "*.json*"))) == ["甲", "乙", "丙"]
    assert list(read_texts(str(tmp_path / "c.json"), text_field="body")) == ["x"]


def test_read_texts_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_texts(str(bad)))
    bad.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no string field 'text'"):
        list(read_texts(str(bad)))
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8 text"):
        list(read_texts(str(bad)))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("好\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt:2: not UTF-8 text"):
        list(read_texts(str(latin)))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"notes\.md: unknown data file type"):
        read_texts(str(tmp_path / "notes.md"))
    with pytest.raises(DataError, match="no .txt/.jsonl/.json files"):
        read_texts(str(tmp_path / "missing"))
    with pytest.raises(CorpusError, match="bundled:wiki: no such text corpus .*peoples-daily, peoples-daily-heldout"):
        read_texts("bundled:wiki")


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs() as bucket:
        yield bucket


def test_read_texts_and_read_alpaca_on_gs_equal_local_and_errors_name_the_url(gcs, tmp_path):
    import fsspec

    files = {"d/b.txt": b"one\n\ntwo\r\n", "d/a.jsonl": '{"text": "甲"}\n\n{"text": "乙"}\n'.encode(),
             "d/sub/c.json": json.dumps([{"text": "丙"}]).encode(), "d/notes.md": b"x",
             "bad.jsonl": b'{"text": "ok"}\n{"text": oops}\n',
             "alpaca.json": json.dumps([{"instruction": "i", "output": "o"}]).encode()}
    for name, data in files.items():  # uploaded by fsspec itself, not by the code under test
        fsspec.filesystem("gcs").pipe(f"{gcs}/{name}", data)
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    for source in ("d/b.txt", "d", "d/*.json*", "d/sub/c.json"):
        local = list(read_texts(str(tmp_path / source)))
        assert local and list(read_texts(f"{gcs}/{source}")) == local, source
    assert read_alpaca(f"{gcs}/alpaca.json") == read_alpaca(str(tmp_path / "alpaca.json"))
    with pytest.raises(DataError, match=re.escape(f"{gcs}/bad.jsonl:2: not valid JSON")):
        list(read_texts(f"{gcs}/bad.jsonl"))
    with pytest.raises(DataError, match=re.escape(f"{gcs}/d/notes.md: unknown data file type")):
        read_texts(f"{gcs}/d/notes.md")
    with pytest.raises(DataError, match=re.escape(f"{gcs}/missing: no .txt/.jsonl/.json files there")):
        read_texts(f"{gcs}/missing")
    with pytest.raises(DataError, match="wildcards may only be in the last part"):
        read_texts(f"{gcs}/*/b.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"No such file or directory: '{gcs}/none.json'")):
        read_alpaca(f"{gcs}/none.json")
    with pytest.raises(ValueError, match="s3://b/x.txt: unsupported URL"):
        read_texts("s3://b/x.txt")


def test_read_texts_hf_saved_datasets(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "", "b"], "n": [1, 2, 3]}).save_to_disk(str(tmp_path / "flat"))
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["t"]}),
                                   "test": datasets.Dataset.from_dict({"content": ["u", "v"]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert list(read_texts(f"hf:{tmp_path / 'flat'}")) == ["a", "b"]
    assert list(read_texts(f"hf:{tmp_path / 'dict'}:test", text_field="content")) == ["u", "v"]
    assert list(read_texts(f"hf:{tmp_path / 'dict'}", text_field="content")) == ["t"]
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\)"):
        read_texts(f"hf:{tmp_path / 'dict'}")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="tensorflow is installed")
def test_read_texts_tfds_without_tensorflow_says_what_to_install():
    with pytest.raises(DataError, match=r"tfds:wiki40b/zh-cn: .*install it \(pip install tensorflow\)"):
        read_texts("tfds:wiki40b/zh-cn")
