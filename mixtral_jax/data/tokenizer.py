"""Tokenizers: the real Mixtral SentencePiece model (shipped inside the PyPI package mistral-common) by
default, or any Hugging Face tokenizer directory; plus Mixtral's `[INST] ... [/INST]` chat format."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from typing import Protocol, Sequence

from mixtral_jax.errors import TokenizerError

MIXTRAL_VOCAB_SIZE = 32000


class Tokenizer(Protocol):
    path: str  # what load_tokenizer reads it from again (data prepare's worker processes do)
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_lines(self, texts: Sequence[str], add_eos: bool) -> list[list[int]]:
        """Each text's `encode(text, add_bos=True)`, EOS appended when `add_eos`: pre-training's lines."""

    def digest(self) -> str: ...


def default_tokenizer_path() -> str:
    """The Mixtral-8x7B tokenizer (32000 pieces, bos 1, eos 2, unk 0) inside mistral-common."""
    return str(resources.files("mistral_common") / "data" / "tokenizer.model.v1")


class SentencePieceTokenizer:
    def __init__(self, model_file: str | None = None):
        import sentencepiece

        self.path = model_file or default_tokenizer_path()
        if not os.path.isfile(self.path):
            raise TokenizerError(f"{self.path}: tokenizer model not found")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({err})") from None
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def encode_lines(self, texts: Sequence[str], add_eos: bool) -> list[list[int]]:
        # One call for the whole list: 1.4x the throughput of a call per line. One thread: data prepare runs one
        # tokenizer per core (SentencePiece would otherwise start threads of its own in every worker).
        return self._sp.encode(list(texts), add_bos=True, add_eos=add_eos, num_threads=1)

    def digest(self) -> str:
        return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()


class HFTokenizer:
    """Any tokenizer directory transformers can read locally (never remote code)."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError) as err:
            raise TokenizerError(f"{directory}: cannot load a tokenizer ({err})") from None
        self.path = directory
        self.bos_id, self.eos_id = self._tok.bos_token_id, self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        if self.vocab_size == 0:
            raise TokenizerError(f"{directory}: the tokenizer has no pieces")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_lines(self, texts: Sequence[str], add_eos: bool) -> list[list[int]]:
        eos = [self.eos_id] if add_eos else []
        return [self.encode(text, add_bos=True) + eos for text in texts]

    def digest(self) -> str:
        vocabulary = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False)
        return hashlib.sha256(vocabulary.encode()).hexdigest()


def model_tokenizer_path(model: str | None) -> str | None:
    """The tokenizer that came with a model directory (a vocabulary-extended model brings its own): its
    SentencePiece `tokenizer.model` when it has one (read directly, as the reference's LlamaTokenizer read
    it), else the directory itself when it holds HF tokenizer files. None when the model brings none (the
    bundled tiny model). A training run's tokenizer is its base model's: pass
    `run_manifest.model_directory(run_dir)`."""
    if model is None or not os.path.isdir(model):
        return None
    names = set(os.listdir(model))
    if "tokenizer.model" in names:
        return os.path.join(model, "tokenizer.model")
    if names & {"tokenizer.json", "tokenizer_config.json"}:
        return model
    return None


def load_tokenizer(path: str | None = None, model: str | None = None) -> Tokenizer:
    """A `.model` file: SentencePiece; a directory: HF tokenizer files (a directory holding only
    `tokenizer.model` is read as SentencePiece); None: the tokenizer of `model` (model_tokenizer_path), else
    the embedded Mixtral tokenizer."""
    path = path or model_tokenizer_path(model)
    if path is None or os.path.isfile(path):
        return SentencePieceTokenizer(path)
    if not os.path.isdir(path):
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    names = set(os.listdir(path))
    if "tokenizer.json" not in names and "tokenizer_config.json" not in names and "tokenizer.model" in names:
        return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
    return HFTokenizer(path)


def identity(tokenizer: Tokenizer) -> dict:
    """What makes two tokenizers give the same ids: their pieces (a digest of the SentencePiece model, or of an
    HF tokenizer's vocabulary), size and special ids; prepared data records it and refuses another."""
    return {"sha256": tokenizer.digest(), "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
            "eos_id": int(tokenizer.eos_id)}


def check_compatible(tokenizer: Tokenizer, vocab_size: int, model_name: str = "model") -> None:
    """A tokenizer may be smaller than the embedding (padded vocabularies) but never larger."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"{getattr(tokenizer, 'path', 'tokenizer')}: {tokenizer.vocab_size} pieces, but "
                             f"{model_name} field 'vocab_size' is {vocab_size}")


def instruct_prompt(instruction: str) -> str:
    """Mixtral-Instruct's single-turn format, as Chinese-Mixtral-Instruct was trained on it."""
    return f"[INST] {instruction} [/INST]"


def chat_ids(tokenizer: Tokenizer, turns: Sequence[tuple[str, str | None]]) -> list[int]:
    """`<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST]` for (user, assistant) turns; the last answer may be None."""
    ids = [tokenizer.bos_id]
    for user, assistant in turns:
        ids += tokenizer.encode(instruct_prompt(user), add_bos=False)
        if assistant is not None:
            ids += tokenizer.encode(assistant, add_bos=False) + [tokenizer.eos_id]
    return ids
