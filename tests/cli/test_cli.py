"""The `mixtral-jax` console script: generation from the bundled model, `convert init`, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.assets import TINY_MODEL_DIR
from mixtral_jax.cli.main import main


@pytest.mark.slow
def test_bundled_tiny_model_is_the_seeded_tiny_preset(tmp_path):
    """The shipped files are what `convert init --preset tiny --seed 0 --dtype bfloat16` makes, bit for bit."""
    assert main(["convert", "init", str(tmp_path / "tiny"), "--preset", "tiny", "--seed", "0",
                 "--dtype", "bfloat16"]) == 0
    for name in ("model.safetensors", "config.json"):
        with open(os.path.join(TINY_MODEL_DIR, name), "rb") as a, open(tmp_path / "tiny" / name, "rb") as b:
            assert a.read() == b.read(), name
    assert os.path.getsize(os.path.join(TINY_MODEL_DIR, "model.safetensors")) < 10 * 2**20


@pytest.mark.slow
def test_generate_prints_json_for_a_batch_of_prompts(capsys):
    assert main(["generate", "--prompt", "中国的首都是", "--prompt", "你好", "--max-new-tokens", "8",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == ["中国的首都是", "你好"] and len(result["outputs"]) == 2
    assert all(isinstance(text, str) and text for text in result["outputs"])


@pytest.mark.slow
def test_generate_matches_the_library_call(capsys):
    from mixtral_jax.data.tokenizer import load_tokenizer
    from mixtral_jax.model.generation import SamplingConfig, generate

    assert main(["generate", "--prompt", "今天天气", "--max-new-tokens", "6", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["outputs"][0]
    tok = load_tokenizer()
    ids = np.array([tok.encode("今天天气")])
    new = generate(mj.from_pretrained(TINY_MODEL_DIR), ids, sampling=SamplingConfig(max_new_tokens=6))[0].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert printed == tok.decode(new)


@pytest.mark.slow
def test_bad_model_directory_is_one_clear_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "generate", str(tmp_path), "--prompt", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and "Traceback" not in result.stderr
