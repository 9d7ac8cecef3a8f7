"""`mixtral-jax vocab extend`: Chinese-LLaMA's vocabulary extension of a model
(mixtral_jax/data/vocab_extension.py), written as an HF directory (weights streamed one layer-tensor at a time, the merged tokenizer beside them)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def register(commands) -> None:
    from convert.cli import _dtype_argument, _output_arguments

    p = commands.add_parser("vocab", help="vocabulary extension (Chinese-LLaMA's method)")
    sub = p.add_subparsers(dest="vocab_command", required=True)
    ext = sub.add_parser(
        "extend", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="train a SentencePiece model on texts, merge its pieces into the model's tokenizer and grow the "
             "embedding and LM head (new rows: the mean of the old ones)",
        description="Trains a SentencePiece model on the texts (with the base tokenizer's normalisation and "
                    "splitting rules), appends its pieces that the base tokenizer lacks (old pieces keep their "
                    "ids), grows embed_tokens and lm_head to the new vocabulary with every new row the mean of "
                    "the old rows, and writes OUT as an HF directory: config.json, safetensors, and the merged "
                    "tokenizer.model with tokenizer_config.json. Prints a JSON summary.")
    ext.add_argument("--model", required=True, help="HF directory, Orbax model checkpoint or training run")
    ext.add_argument("--texts", required=True, action="append", metavar="SRC",
                     help="texts as `mixtral-jax train` reads them: a .txt file (a text a line), a .jsonl/.json "
                          "file (objects with a string 'text'), a directory or glob of them (local or gs://), "
                          "hf:NAME[:split], tfds:NAME[:split] or bundled:NAME (e.g. bundled:peoples-daily); "
                          "repeat for more")
    ext.add_argument("--vocab-size", type=int, default=20000,
                     help="pieces of the SentencePiece model trained on the texts (Chinese-LLaMA: 20000)")
    ext.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"],
                     help="SentencePiece algorithm of the trained model (the base must be BPE; unigram pieces "
                          "that BPE cannot build are counted in the summary)")
    ext.add_argument("--character-coverage", type=float, default=0.9995,
                     help="share of the texts' characters the trained model covers (rarer ones stay bytes)")
    ext.add_argument("--tokenizer", default=None,
                     help="SentencePiece model to extend (default: the model's own tokenizer.model, else "
                          "Mixtral's from mistral-common)")
    ext.add_argument("--out", required=True, metavar="OUT_DIR", help="output HF directory")
    _dtype_argument(ext)
    ext.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (5GB = 5*10^9 bytes)")
    _output_arguments(ext)
    ext.set_defaults(run=run_extend)


def extend(model: str, sources: list[str], out: str, vocab_size: int = 20000, model_type: str = "bpe",
           character_coverage: float = 0.9995, tokenizer: str | None = None, dtype: str = "keep",
           max_shard_size: str = "5GB", overwrite: bool = False, show_progress: bool = True) -> dict:
    """Writes the extended model to `out` (under a temporary name, renamed when complete); returns a summary."""
    from convert.orbax_hf import parse_size
    from mixtral_jax.checkpoints.hf_files import write_pretrained
    from mixtral_jax.checkpoints.open_source import open_source
    from mixtral_jax.checkpoints.run_manifest import model_directory
    from mixtral_jax.data.texts import read_texts
    from mixtral_jax.data.tokenizer import default_tokenizer_path, model_tokenizer_path
    from mixtral_jax.data.vocab_extension import (
        TOKENIZER_FILES,
        ResizedSource,
        merge_pieces,
        read_model,
        train_sentencepiece,
        unreachable_pieces,
        write_tokenizer_files,
    )
    from mixtral_jax.errors import CheckpointError, TokenizerError

    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    base_path = tokenizer or model_tokenizer_path(model_directory(model)) or default_tokenizer_path()
    if os.path.isdir(base_path):
        raise TokenizerError(f"{base_path}: HF tokenizer files without a tokenizer.model to extend; pass "
                             f"--tokenizer FILE.model")
    base = read_model(base_path)
    source = open_source(model)
    if source.config.vocab_size != len(base.pieces):
        raise TokenizerError(f"{model}: field 'vocab_size' is {source.config.vocab_size}, but {base_path} has "
                             f"{len(base.pieces)} pieces; new pieces must follow the model's last row (pass the "
                             f"model's own --tokenizer)")
    texts = [text for src in sources for text in read_texts(src)]
    if not any(text.strip() for text in texts):
        raise ValueError(f"{', '.join(sources)}: no text")
    if show_progress:
        print(f"training a {vocab_size}-piece {model_type} SentencePiece model on {len(texts):,} texts",
              file=sys.stderr)
    trained = train_sentencepiece(texts, vocab_size, base, model_type, character_coverage)
    merged, added = merge_pieces(base, trained)
    resized = ResizedSource(source, len(merged.pieces))
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tokenizer_files(merged, tokenizer_dir)
        extra = {**resized.extra_files(), **{name: os.path.join(tokenizer_dir, name) for name in TOKENIZER_FILES}}
        write_pretrained(resized.config, resized.read, out, max_shard_bytes=parse_size(max_shard_size),
                         dtype=None if dtype == "keep" else dtype, overwrite=overwrite, extra_files=extra,
                         show_progress=show_progress, read_part=resized.read_part)
    return {"wrote": out, "base_tokenizer": base_path, "base_pieces": len(base.pieces),
            "trained_pieces": len(trained.pieces), "added_pieces": added, "vocab_size": len(merged.pieces),
            "unreachable_added_pieces": len(unreachable_pieces(merged, len(base.pieces))), "texts": len(texts)}


def run_extend(args) -> int:
    summary = extend(args.model, args.texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                     character_coverage=args.character_coverage, tokenizer=args.tokenizer, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, overwrite=args.overwrite, show_progress=not args.quiet)
    print(json.dumps(summary, ensure_ascii=False))
    return 0
