"""`mixtral-jax convert hf-to-orbax | orbax-to-hf | verify`: transformers loads what we write, a LoRA run merged
on export, bad inputs refused cleanly, and the comparison command."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from mixtral_jax.checkpoints import pretrained
from mixtral_jax.checkpoints import run_manifest as runs
from mixtral_jax.checkpoints import run_state as checkpoint
from mixtral_jax.checkpoints.hf_model import save_pretrained
from mixtral_jax.checkpoints.pretrained import from_pretrained
from mixtral_jax.cli.main import main
from mixtral_jax.model.lora import LoRAParam
from tests.checkpoints.test_orbax_format import INPUT_IDS, NAME, logits_of


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS, dtype=torch.long)).logits.float().numpy()


def leftovers(path) -> list[str]:
    parent, base = os.path.split(os.fspath(path))
    return [n for n in os.listdir(parent) if n == base or n.startswith(f".{base}")]


@pytest.fixture(scope="module")
def hf_dir(reference_dirs):
    return reference_dirs(NAME)[1]


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "orbax")
    assert main(["convert", "hf-to-orbax", hf_dir, out, "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_transformers_loads_what_orbax_to_hf_writes(orbax_dir, tmp_path):
    from transformers import MixtralForCausalLM

    out = tmp_path / "hf"
    assert main(["convert", "orbax-to-hf", orbax_dir, str(out), "--max-shard-size", "50KB", "--quiet"]) == 0
    names = sorted(os.listdir(out))
    assert "config.json" in names and "generation_config.json" in names
    shards = [n for n in names if n.endswith(".safetensors")]
    assert "model.safetensors.index.json" in names and len(shards) > 2
    assert all(os.path.getsize(out / n) <= 50_000 + 4096 for n in shards)
    hf = MixtralForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(hf), logits_of(from_pretrained(orbax_dir)), atol=1e-4, rtol=0)


def test_dtype_option_and_tokenizer_files_carried(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    from mixtral_jax.data.tokenizer import default_tokenizer_path

    shutil.copyfile(default_tokenizer_path(), src / "tokenizer.model")
    assert main(["convert", "hf-to-orbax", str(src), str(tmp_path / "orbax"), "--dtype", "bfloat16", "--quiet"]) == 0
    assert os.path.isfile(tmp_path / "orbax" / "tokenizer.model")
    assert main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"), "--quiet"]) == 0
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.model")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "hf" / "config.json"))["torch_dtype"] == "bfloat16"


def test_converting_and_verifying_never_import_jax(hf_dir, tmp_path):
    """The converters between HF and Orbax directories, and verify between them, run on numpy alone: importing
    JAX and Flax is ~1 s of a 4 s conversion at Mixtral-8x7B's widths (README, Performance)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from mixtral_jax.cli.main import main\n"
        "a, b, c = sys.argv[1:]\n"
        "assert main(['convert', 'hf-to-orbax', a, b, '--quiet']) == 0\n"
        "assert main(['convert', 'orbax-to-hf', b, c, '--quiet']) == 0\n"
        "assert main(['convert', 'verify', a, c]) == 0\n"
        "assert main(['convert', 'verify', b, c]) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax')))\n")
    result = subprocess.run([sys.executable, "-c", script, hf_dir, str(tmp_path / "orbax"), str(tmp_path / "hf")],
                            capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------------ LoRA runs
@pytest.fixture(scope="module")
def lora_run(hf_dir, tmp_path_factory):
    """A LoRA run directory written by hand: adapters (B not zero) and a trained embedding at step 3."""
    run_dir = str(tmp_path_factory.mktemp("run") / "run")
    os.makedirs(run_dir)
    run_model = runs.RunModel(base=hf_dir, dtype="float32",
                                    lora={"rank": 4, "alpha": 8.0, "dropout": 0.0},
                                    modules_to_save=("embed_tokens",), lora_seed=1)
    runs.write_manifest(run_dir, run_model)
    model = pretrained.build_model(run_model)
    key = jax.random.key(7)
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, LoRAParam) and str(path[-1]).endswith("_lora_b"):
            key, sub = jax.random.split(key)
            variable.set_value(0.05 * jax.random.normal(sub, variable.get_value().shape))
    model.embed_tokens.set_value(model.embed_tokens[...] + 0.01)
    _, params, _ = nnx.split(model, run_model.trainable(), ...)
    manager = checkpoint.open_manager(run_dir, async_save=False)
    checkpoint.save(manager, 3, params, {"count": jnp.zeros((), jnp.int32)}, {"step": 3})
    manager.wait_until_finished()
    manager.close()
    return run_dir


@pytest.mark.slow
def test_merged_export_of_a_lora_run_matches_the_lora_model(lora_run, hf_dir, tmp_path):
    from transformers import MixtralForCausalLM

    lora_model = from_pretrained(lora_run)
    assert np.abs(logits_of(lora_model) - logits_of(from_pretrained(hf_dir))).max() > 1e-3  # adapters matter
    out = tmp_path / "merged"
    assert main(["convert", "orbax-to-hf", lora_run, str(out), "--merge", "--quiet"]) == 0
    np.testing.assert_allclose(logits_of(from_pretrained(str(out))), logits_of(lora_model), atol=1e-4, rtol=0)
    hf = MixtralForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(hf), logits_of(lora_model), atol=1e-4, rtol=0)
    # --base names the full-precision base explicitly (here the same one): the same result.
    assert main(["convert", "orbax-to-hf", lora_run, str(tmp_path / "merged2"), "--merge", "--base", hf_dir,
                 "--quiet"]) == 0
    assert main(["convert", "verify", str(out), str(tmp_path / "merged2")]) == 0


def test_a_lora_run_without_merge_is_refused_with_a_hint(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["convert", "orbax-to-hf", lora_run, str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--merge" in err and "export-peft" in err and err.count("\n") == 1
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------------ bad inputs
def test_corrupt_header_is_one_clear_error_and_no_output(hf_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    with open(src / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 2**40))
    out = tmp_path / "out"
    assert main(["convert", "hf-to-orbax", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "corrupt safetensors header" in err and err.count("\n") == 1
    assert leftovers(out) == []


def test_missing_shard_is_one_clear_error_and_no_output(hf_dir, tmp_path, capsys):
    src = tmp_path / "sharded"
    save_pretrained(from_pretrained(hf_dir), src, max_shard_bytes=30_000)
    shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    os.remove(src / shard)
    out = tmp_path / "out"
    assert main(["convert", "hf-to-orbax", str(src), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert shard in err and "missing" in err and err.count("\n") == 1
    assert leftovers(out) == []


def test_existing_output_is_refused_unless_overwrite(orbax_dir, hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for argv in (["hf-to-orbax", hf_dir, str(out)], ["orbax-to-hf", orbax_dir, str(out)]):
        assert main(["convert", *argv, "--quiet"]) == 2
        assert "already exists" in capsys.readouterr().err
        assert os.listdir(out) == ["keep.txt"] and leftovers(out) == ["out"]
    assert main(["convert", "orbax-to-hf", orbax_dir, str(out), "--overwrite", "--quiet"]) == 0
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert leftovers(out) == ["out"]


def test_failure_mid_conversion_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from mixtral_jax.checkpoints import sources as layer_tensors
    from mixtral_jax.checkpoints.hf_to_orbax import convert_hf
    from mixtral_jax.errors import CheckpointError

    calls = []
    real = layer_tensors.HFSource.read

    def failing(self, param, layer, out=None):
        calls.append(param)
        if len(calls) == 6:
            raise CheckpointError("disk went away")
        return real(self, param, layer, out)

    monkeypatch.setattr(layer_tensors.HFSource, "read", failing)
    with pytest.raises(CheckpointError, match="disk went away"):
        convert_hf(hf_dir, tmp_path / "out")
    assert leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ verify
def test_verify_identical_and_perturbed(hf_dir, orbax_dir, tmp_path, capsys):
    assert main(["convert", "verify", hf_dir, orbax_dir]) == 0
    assert "identical" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][3, 5] += 0.25
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", "verify", orbax_dir, str(bad)]) == 1
    out = capsys.readouterr().out
    first = out.splitlines()[1]
    assert first.split()[0] == key and float(first.split()[-1]) == pytest.approx(0.25, abs=1e-6)
    assert "1 differ" in out
    assert main(["convert", "verify", orbax_dir, str(bad), "--atol", "0.3"]) == 0
    capsys.readouterr()
    assert main(["convert", "verify", orbax_dir, str(bad), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["differing"] == 1 and result["largest"][0]["tensor"] == key


@pytest.mark.slow
def test_a_resized_vocabulary_is_carried_through(tmp_path, capsys):
    """A model whose embedding and head were resized (e.g. by vocabulary extension) converts both ways
    unchanged: nothing in the converters assumes Mixtral's 32,000 pieces."""
    hf, orbax, back = (str(tmp_path / name) for name in ("hf", "orbax", "back"))
    assert main(["convert", "init", hf, "vocab_size=32768", "--preset", "tiny", "--seed", "1"]) == 0
    assert main(["convert", "hf-to-orbax", hf, orbax, "--quiet"]) == 0
    assert main(["convert", "orbax-to-hf", orbax, back, "--quiet"]) == 0
    assert json.load(open(os.path.join(back, "config.json")))["vocab_size"] == 32768
    assert from_pretrained(orbax).embed_tokens.shape == (32768, 64)
    capsys.readouterr()
    assert main(["convert", "verify", hf, back]) == 0


# ------------------------------------------------------------------------------------------------ dtypes
def test_from_pretrained_takes_dtype_objects_and_short_forms(hf_dir):
    """jnp and np dtypes (and "bf16"-style names, below); a bad one is blamed on the argument, not on
    config.json."""
    from mixtral_jax.errors import ConfigError

    assert from_pretrained(hf_dir, dtype=jnp.bfloat16).embed_tokens[...].dtype == jnp.bfloat16
    model = from_pretrained(hf_dir, dtype=np.float32)
    assert (model.config.dtype, model.config.param_dtype) == ("float32", "float32")
    for bad in ("float64", np.int8):
        with pytest.raises(ConfigError, match=r"^from_pretrained: argument 'dtype': expected one of") as info:
            from_pretrained(hf_dir, dtype=bad)
        assert "config.json" not in str(info.value)


@pytest.mark.slow
def test_save_pretrained_and_the_converters_take_dtype_objects_and_short_forms(hf_dir, orbax_dir, tmp_path):
    import ml_dtypes

    from convert.orbax_hf import hf_to_orbax, orbax_to_hf
    from mixtral_jax.checkpoints.orbax_format import MARKER
    from mixtral_jax.errors import ConfigError

    assert from_pretrained(orbax_dir, dtype="bf16").config.param_dtype == "bfloat16"
    assert from_pretrained(hf_dir, dtype=torch.float16).config.dtype == "float16"
    model = from_pretrained(hf_dir)
    with pytest.raises(ConfigError, match=r"^save_pretrained: argument 'dtype'"):
        save_pretrained(model, tmp_path / "bad", dtype="fp64")
    save_pretrained(model, tmp_path / "saved", dtype=ml_dtypes.bfloat16)
    assert json.load(open(tmp_path / "saved" / "config.json"))["torch_dtype"] == "bfloat16"
    hf_to_orbax(hf_dir, str(tmp_path / "orbax16"), dtype=jnp.float16, show_progress=False)
    assert json.load(open(tmp_path / "orbax16" / MARKER))["dtype"] == "float16"
    orbax_to_hf(orbax_dir, str(tmp_path / "hf"), dtype="bf16", show_progress=False)
    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    with pytest.raises(ConfigError, match=r"^orbax_to_hf: argument 'dtype'"):
        orbax_to_hf(orbax_dir, str(tmp_path / "hf2"), dtype="double", show_progress=False)
    assert leftovers(tmp_path / "bad") == [] and leftovers(tmp_path / "hf2") == []


# ------------------------------------------------------------------------------------------------ disk faults
def _failing_writes(monkeypatch, under, error):
    """os.write (and O_CREAT opens, for EROFS) of files under `under` raise `error`; every other call is real."""
    from mixtral_jax.io import direct_files

    real_write, real_open = os.write, os.open

    inside = str(under) + os.sep

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(inside):
            raise error
        return real_write(fd, data)

    def open_(path, flags, *args, **kwargs):
        if getattr(error, "errno", None) == errno.EROFS and flags & os.O_CREAT and os.fspath(path).startswith(inside):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(direct_files.os, "write", write)
    monkeypatch.setattr(direct_files.os, "open", open_)


@pytest.mark.parametrize("command", ["hf-to-orbax", "orbax-to-hf"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_full_or_read_only_disk_is_one_line_exit_1_and_no_output(hf_dir, orbax_dir, tmp_path, monkeypatch,
                                                                    capsys, command, code):
    """Not `BufferError: cannot close exported pointers exist` from the O_DIRECT stage's cleanup, nor a
    traceback: the path and the cause; the temporary output removed."""
    out = tmp_path / "out"
    _failing_writes(monkeypatch, tmp_path, OSError(code, os.strerror(code)))
    src = hf_dir if command == "hf-to-orbax" else orbax_dir
    assert main(["convert", command, src, str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    cause = os.strerror(code)
    assert err.startswith(f"mixtral-jax convert: error: {out}{os.sep}") and err.endswith(
        f": {cause[0].lower()}{cause[1:]}\n"), err
    assert err.count("\n") == 1 and "Buffer" not in err
    assert leftovers(out) == []


def test_an_output_folder_that_cannot_be_created_is_named(orbax_dir, tmp_path, monkeypatch, capsys):
    """tempfile.mkdtemp's own error names the temporary sibling it tried: the message names OUT instead."""
    from mixtral_jax.io import output_dir

    def refused(prefix="", dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, prefix + "x1y2"))

    monkeypatch.setattr(output_dir.tempfile, "mkdtemp", refused)
    out = tmp_path / "out"
    assert main(["convert", "orbax-to-hf", orbax_dir, str(out), "--quiet"]) == 1
    assert capsys.readouterr().err == f"mixtral-jax convert: error: {out}: permission denied\n"


def test_ctrl_c_mid_conversion_is_exit_130_and_no_output(orbax_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _failing_writes(monkeypatch, tmp_path, KeyboardInterrupt())
    assert main(["convert", "orbax-to-hf", orbax_dir, str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == "mixtral-jax convert: interrupted\n"
    assert leftovers(out) == []
