"""Vocabulary extension by Chinese-LLaMA's method, which the paper's "Chinese-Mixtral-ext" variant uses: train
a SentencePiece model on Chinese text, append its pieces that Mixtral's tokenizer lacks, and grow the embedding
and the LM head to the new vocabulary, every new row the mean of the old rows.

Scores of the appended pieces. Chinese-LLaMA's merge_tokenizers.py gives every new piece score 0. SentencePiece's
BPE merges the highest-scored piece first, so those pieces go before every old one and tie among themselves,
while transformers 5 orders a converted model's BPE merges by piece id alone: the two tokenizations then
disagree (on 548 of the 949 held-out People's Daily sentences with a 20,000-piece Chinese model). We continue
the base's own ranking instead: new piece k scores one below the lowest-ranked old merge, minus k (in the
trained model's order), which SentencePiece and transformers read the same way (no sentence differs), at the
same compression (0.6120 against 0.6118 tokens per character on that text).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Iterable

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as pb

from mixtral_jax.errors import TokenizerError

NORMAL = pb.ModelProto.SentencePiece.NORMAL
# Whitespace runs sit at -1e9 in Mixtral's model (merged last whatever their id); they are not "the
# lowest-ranked merge" that new pieces follow.
_SENTINEL_SCORE = -1e8
# Settings of the base model that decide how text is cut before pieces are learnt: the new model is trained
# with them, so that its pieces are spelled the way the base sees text (e.g. no NFKC-folded punctuation).
_TRAINER_FIELDS = ("split_by_unicode_script", "split_by_whitespace", "split_by_number", "split_digits",
                   "treat_whitespace_as_suffix", "allow_whitespace_only_pieces", "max_sentencepiece_length")
# Where the vocabulary axis is in our layout: embed_tokens [V, D], lm_head [D, V].
VOCAB_AXES = {"embed_tokens": 0, "lm_head": 1}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_STALE_FILES = ("tokenizer.json", "added_tokens.json")  # a source's tokenizer files that describe the old vocabulary


# ------------------------------------------------------------------------------------------------ tokenizers
def read_model(path: str) -> pb.ModelProto:
    """A SentencePiece model file as its protobuf (the form merging edits)."""
    model = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read the SentencePiece model ({err.strerror})") from None
    except Exception as err:  # protobuf's DecodeError has no stable import path across its versions
        raise TokenizerError(f"{path}: not a SentencePiece model ({err})") from None
    if not model.pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model (field 'pieces' is empty)")
    return model


def train_sentencepiece(texts: Iterable[str], vocab_size: int, base: pb.ModelProto, model_type: str = "bpe",
                        character_coverage: float = 0.9995) -> pb.ModelProto:
    """A SentencePiece model of `vocab_size` pieces learnt from the lines of `texts`, with the base's
    normalisation and splitting rules and without byte pieces (the base has them)."""
    import sentencepiece

    trainer, normalizer = base.trainer_spec, base.normalizer_spec
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    out = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=out, model_type=model_type, vocab_size=vocab_size,
            character_coverage=character_coverage, byte_fallback=False, max_sentence_length=1 << 16,
            normalization_rule_name=normalizer.name or "identity", add_dummy_prefix=normalizer.add_dummy_prefix,
            remove_extra_whitespaces=normalizer.remove_extra_whitespaces,
            num_threads=os.cpu_count() or 1, minloglevel=2,
            **{name: getattr(trainer, name) for name in _TRAINER_FIELDS})
    except RuntimeError as err:  # e.g. "Vocabulary size too high": say which setting to change
        raise TokenizerError(f"training a {vocab_size}-piece {model_type} SentencePiece model: {err} "
                             f"(choose another --vocab-size or give more text)") from None
    model = pb.ModelProto()
    model.ParseFromString(out.getvalue())
    return model


def merge_pieces(base: pb.ModelProto, extra: pb.ModelProto) -> tuple[pb.ModelProto, int]:
    """The base with every normal piece of `extra` it lacks appended (old pieces keep their ids), and how
    many were appended. Scores continue the base's ranking (see the module docstring)."""
    if base.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise TokenizerError(f"the base tokenizer is a {pb.TrainerSpec.ModelType.Name(base.trainer_spec.model_type)} "
                             f"model (field 'trainer_spec.model_type'); merging needs a BPE base such as "
                             f"Mixtral's or LLaMA's")
    merged = pb.ModelProto()
    merged.CopyFrom(base)
    present = {p.piece for p in merged.pieces}
    lowest = min((p.score for p in merged.pieces if p.type == NORMAL and p.score > _SENTINEL_SCORE), default=0.0)
    added = 0
    for piece in extra.pieces:
        if piece.type == NORMAL and piece.piece not in present:
            present.add(piece.piece)
            merged.pieces.add(piece=piece.piece, score=lowest - 1 - added, type=NORMAL)
            added += 1
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged, added


def unreachable_pieces(model: pb.ModelProto, first: int = 0) -> list[str]:
    """Pieces from id `first` on, longer than one character, that BPE can never produce: no split of them into
    two pieces of the model (pieces of a unigram model often are, once appended to a BPE base)."""
    present = {p.piece for p in model.pieces}
    return [p.piece for p in model.pieces[first:] if p.type == NORMAL and len(p.piece) > 1
            and not any(p.piece[:i] in present and p.piece[i:] in present for i in range(1, len(p.piece)))]


def write_tokenizer_files(model: pb.ModelProto, directory: str) -> None:
    """`tokenizer.model` plus the tokenizer_config.json and special_tokens_map.json of Mixtral's release, so
    that our loader, transformers' LlamaTokenizer (any version) and AutoTokenizer all read it alike: a BOS
    and no EOS added, SentencePiece's dummy prefix kept (legacy)."""
    spec = model.trainer_spec
    specials = {"bos_token": model.pieces[spec.bos_id].piece, "eos_token": model.pieces[spec.eos_id].piece,
                "unk_token": model.pieces[spec.unk_id].piece}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
              "clean_up_tokenization_spaces": False, **specials}
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.SerializeToString())
    for name, values in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(values, f, indent=2)


# ------------------------------------------------------------------------------------------------ weights
def extend_rows(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    """`array` grown to `size` along `axis`, every new entry the mean of the old ones (computed in fp32, then
    cast to the array's dtype): new tokens start where the average old token is."""
    array = np.asarray(array)
    old = array.shape[axis]
    if size < old:
        raise ValueError(f"vocabulary of {size} pieces: smaller than the model's {old}; extension only grows it")
    mean = np.mean(array.astype(np.float32), axis=axis, keepdims=True, dtype=np.float32).astype(array.dtype)
    reps = [1] * array.ndim
    reps[axis] = size - old
    return np.concatenate([array, np.tile(mean, reps)], axis=axis)


def resize_vocab(model, vocab_size: int):
    """Grows a model's embed_tokens and lm_head (one matrix when tied) to `vocab_size` with extend_rows and
    sets config.vocab_size, in place; returns the model. Outputs for old token ids are unchanged."""
    import jax.numpy as jnp
    from flax import nnx

    old_config = model.config
    for name, axis in VOCAB_AXES.items():
        if name == "lm_head" and old_config.tie_word_embeddings:
            continue
        variable = getattr(model, name)
        variable.set_value(jnp.asarray(extend_rows(np.asarray(variable.get_value()), vocab_size, axis)))
    config = dataclasses.replace(old_config, vocab_size=vocab_size)
    for _, module in list(nnx.iter_graph(model)):  # the layers hold the config too
        if isinstance(module, nnx.Module) and getattr(module, "config", None) is old_config:
            module.config = config
    return model


class ResizedSource:
    """A layer-tensor source (mixtral_jax.checkpoints.sources) seen with its vocabulary grown to `vocab_size`:
    embed_tokens and lm_head come back extended, everything else as read, so write_pretrained streams a
    resized model of any size while holding one layer-tensor at a time."""

    def __init__(self, source, vocab_size: int):
        self.source = source
        self.config = dataclasses.replace(source.config, vocab_size=vocab_size)

    def items(self):
        return self.source.items()

    def read(self, param: str, layer: int | None) -> np.ndarray:
        array = self.source.read(param, layer)
        axis = VOCAB_AXES.get(param)
        return array if axis is None else extend_rows(array, self.config.vocab_size, axis)

    def read_part(self, param: str, layer: int | None, inner: tuple, out: np.ndarray | None = None) -> np.ndarray:
        return self.source.read_part(param, layer, inner, out) if inner else self.read(param, layer)

    def extra_files(self) -> dict[str, str]:
        """The source's files beside the weights, less its tokenizer files (the old vocabulary's)."""
        return {name: path for name, path in self.source.extra_files().items()
                if name not in TOKENIZER_FILES + _STALE_FILES}
