"""The Mixtral tokenizer as an HF tokenizer directory, as Chinese-Mixtral's scripts load it (tests compare our
tokenisation with transformers')."""

from __future__ import annotations

import json
import shutil

from mixtral_jax.data.tokenizer import default_tokenizer_path

# The settings of Mixtral-8x7B's tokenizer_config.json that matter here (transformers 5 adds no BOS for a bare
# tokenizer.model). Without a tokenizer_class, transformers converts the SentencePiece model itself, which
# keeps SentencePiece's dummy prefix as transformers 4.37's LlamaTokenizer (legacy), used by Chinese-Mixtral, did.
MIXTRAL_TOKENIZER_CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                            "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}


def hf_tokenizer_dir(path, **config) -> str:
    """`path` made an HF tokenizer directory: Mixtral's tokenizer.model and a tokenizer_config.json."""
    shutil.copy(default_tokenizer_path(), path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({**MIXTRAL_TOKENIZER_CONFIG, **config}))
    return str(path)
