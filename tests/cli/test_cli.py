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


# ------------------------------------------------------------------------------------------------ options
def option_help(capsys, *argv) -> dict[str, str]:
    """`--help` of a command as {option or positional: its help entry, one line}."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    entries, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.strip():
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in entries.items()}


def test_dtype_flags_take_short_forms_and_dtype_names_everywhere(capsys):
    from mixtral_jax.cli.main import build_parser, parse

    parser = build_parser()
    cases = [(["generate", "--prompt", "x", "--dtype", "bf16"], "bfloat16"),
             (["generate", "--prompt", "x"], None),
             (["eval", "ppl", "--model", "m", "--dtype", "FP32"], "float32"),
             (["eval", "mcq", "--model", "m", "--data", "d", "--dtype", "half"], "float16"),
             (["convert", "hf-to-orbax", "a", "b", "--dtype", "bf16"], "bfloat16"),
             (["convert", "orbax-to-hf", "a", "b"], "keep"),
             (["convert", "orbax-to-hf", "a", "b", "--dtype", "fp16"], "float16"),
             (["convert", "init", "out", "--dtype", "bf16"], "bfloat16"),
             (["convert", "init", "out"], "float32")]
    for argv, expected in cases:
        assert parse(parser, argv).dtype == expected, argv
    for argv in (["generate", "--prompt", "x", "--dtype", "float64"], ["convert", "init", "out", "--dtype", "keep"]):
        with pytest.raises(SystemExit) as done:
            parse(parser, argv)
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --dtype: '{argv[-1]}': expected " in err and "bfloat16" in err and "bf16" in err


def test_help_shows_every_default_once(capsys):
    """Each option's help ends with its default, stated once (not the help's own "default: ..." plus
    argparse's), for generate, convert init and every eval command."""
    commands = [["generate"], ["convert", "init"], ["convert", "hf-to-orbax"], ["convert", "orbax-to-hf"]]
    commands += [["eval", name] for name in ("mcq", "harness", "ppl", "tokenizer", "experts")]
    for argv in commands:
        entries = option_help(capsys, *argv)
        for name, text in entries.items():
            if name in ("-h", "OUT", "out", "SRC", "HF_DIR"):
                continue
            assert text.lower().count("default:") == 1, (argv, text)
    generate = option_help(capsys, "generate")
    for option, default in (("--max-new-tokens", "64"), ("--temperature", "0.0"), ("--top-k", "0"),
                            ("--top-p", "1.0"), ("--repetition-penalty", "1.0"), ("--seed", "0"),
                            ("--moe-backend", "dropless")):
        assert generate[option].endswith(f"(default: {default})"), generate[option]
    assert "how the experts are computed" in generate["--moe-backend"]
    mcq = option_help(capsys, "eval", "mcq")
    assert "how the experts are computed" in mcq["--moe-backend"] and "at once" in mcq["--batch"]
    assert "at once" in option_help(capsys, "eval", "harness")["--batch"]


def test_convert_init_help_lists_the_model_presets_and_takes_overrides_after_options(capsys, tmp_path):
    from mixtral_jax.cli.main import build_parser, parse
    from mixtral_jax.config import list_presets

    entries = option_help(capsys, "convert", "init")
    assert entries["--preset"].endswith("(default: tiny)") and entries["--seed"].endswith("(default: 0)")
    assert entries["--dtype"].endswith("(default: float32)")
    for preset in set(list_presets()) - {"sharding_rules"}:
        assert preset in entries["--preset"]
    assert "sharding_rules" not in " ".join(entries.values())
    parser = build_parser()
    args = parse(parser, ["convert", "init", "out", "--preset", "tiny", "vocab_size=128", "num_hidden_layers=1"])
    assert (args.out, args.preset, args.overrides) == ("out", "tiny", ["vocab_size=128", "num_hidden_layers=1"])
    args = parse(parser, ["convert", "init", "out", "vocab_size=128", "--seed", "3", "num_hidden_layers=1"])
    assert (args.seed, args.overrides) == (3, ["vocab_size=128", "num_hidden_layers=1"])
    for argv in (["convert", "init", "out", "--preset", "sharding_rules"], ["convert", "init", "out", "--bogus=1"],
                 ["generate", "m", "--prompt", "x", "key=value"]):
        with pytest.raises(SystemExit) as done:
            parse(parser, argv)
        assert done.value.code == 2
    capsys.readouterr()


@pytest.mark.slow
def test_convert_init_with_overrides_after_the_options_writes_them(tmp_path):
    out = tmp_path / "m"
    assert main(["convert", "init", str(out), "--preset", "tiny", "vocab_size=128", "num_hidden_layers=1",
                 "--dtype", "bf16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["num_hidden_layers"], config["torch_dtype"]) == (128, 1, "bfloat16")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    import convert.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert.cli, "run_init", interrupted)
    assert main(["convert", "init", str(tmp_path / "m")]) == 130
    assert capsys.readouterr().err == "mixtral-jax convert: interrupted\n"
