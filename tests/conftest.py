"""Shared fixtures: tiny random transformers Mixtral models saved as HF directories, made once per session.
torch is imported by the fixture that builds them, so a test that does not compare with transformers never
imports it. Tests marked `slow` (subprocess runs, whole training runs, Pallas interpret mode) are left out of
`make test-quick`."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# Tiny configs that differ in GQA ratio, head_dim, top-k, expert count and sliding window.
REFERENCE_CONFIGS = {
    "gqa2_top2": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                      sliding_window=None),
    "mha_top1_hd16": dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_local_experts=8,
                          num_experts_per_tok=1, sliding_window=6),
    "mqa_top3": dict(vocab_size=112, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=1, head_dim=8, num_local_experts=6,
                     num_experts_per_tok=3, sliding_window=None),
    "gqa4_top2_window": dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                             num_experts_per_tok=2, sliding_window=5),
}


def make_reference_model(name: str, seed: int = 0):
    """A transformers MixtralForCausalLM (fp32, eval mode) with random weights for REFERENCE_CONFIGS[name]."""
    import torch
    from transformers import MixtralConfig as HFMixtralConfig
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    config = HFMixtralConfig(max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                             router_aux_loss_coef=0.02, **REFERENCE_CONFIGS[name])
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises norms to one; perturb them so a mix-up cannot go unseen
        for module_name, param in model.named_parameters():
            if "norm" in module_name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="session")
def reference_dirs(tmp_path_factory):
    """name -> (transformers model, HF directory that transformers' save_pretrained wrote)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_reference_model(name)
            directory = tmp_path_factory.mktemp(f"hf_{name}")
            model.save_pretrained(directory)
            cache[name] = (model, str(directory))
        return cache[name]

    return get


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
    """A whole-suite process otherwise keeps every XLA program it compiled (hundreds: their code mappings
    add up towards the kernel's per-process limit, where XLA's compiler aborts the process)."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


@pytest.fixture(scope="session")
def sp():
    """Mixtral's SentencePiece tokenizer as the library loads it."""
    from mixtral_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """The same tokenizer through transformers, as Chinese-Mixtral's scripts load it."""
    from transformers import AutoTokenizer

    from tests.helpers.tokenizers import hf_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir(tmp_path_factory.mktemp("hf_tok")))
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    return tok
