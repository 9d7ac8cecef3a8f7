"""Forward and greedy-decoding speed of our Mixtral against transformers, same random weights, one process.

    python -m bench.bench_model --config bench-tiny|bench-moe|both [--backends dense,dropless,capacity]
                                [--repeats N] [--json OUT] [--all-decode] [--breakdown]

What is timed (all fp32, on the host CPU):

* A transformers `MixtralForCausalLM` is built from our preset (`MixtralConfig.from_preset(name).to_hf()`),
  seeded with `torch.manual_seed`, put in eval mode, written with `save_pretrained` to a temporary directory,
  and read back by `mixtral_jax.from_pretrained(dir, moe_backend=..., grouped_matmul=..., capacity_factor=...)`.
* Forward: a batch of 4 x 256 random tokens. Ours: `graphdef, state = nnx.split(model)` and one jitted
  function that merges and returns the logits (`block_until_ready`). Transformers: `model(ids).logits` under
  `torch.no_grad()`. After a warm-up, the two alternate (ours, transformers, ours, ...) for N repeats; each
  backend row has its own interleaved transformers timings, so ratios compare programs measured side by side.
* Greedy decoding: batch 1 (`--decode-batch`), 32 prompt tokens, 64 new tokens. Ours:
  `mixtral_jax.model.generation.generate(model, ids, sampling=SamplingConfig(max_new_tokens=64), eos_token_id=-1)`
  (the first call compiles and is reported separately); transformers: `model.generate(ids, max_new_tokens=64,
  min_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)`. Reported: new tokens per second,
  and whether the two produced the same tokens.
* Peak: the median time of a jitted 2048 x 2048 x 2048 fp32 matmul in JAX (and, for information, torch.mm
  with the thread count transformers runs with), measured in the same run.

FLOPs (the "useful" model FLOPs, the same for every backend; a multiply-add counts 2):

    forward FLOPs / token = 2 * N_active + L * 4 * S * (H * hd)

    N_active = L * [D*H*hd + 2*D*KV*hd + H*hd*D      (q, k, v, o projections)
                    + D*E                           (router)
                    + k * 3*D*F]                    (the top-k experts' w1, w3, w2)
               + D*V                                (LM head; the embedding lookup is not a matmul)

    L * 4 * S * H*hd: attention scores Q K^T and the value product P V over the full S x S square (2 FLOPs per
    multiply-add, two products), counted without halving for the causal mask.

bench-tiny (D 256, F 512, L 4, H 8, KV 4, hd 32, E 8, k 2, V 32000, S 256): N_active = 12,132,352,
forward = 25.31M FLOPs/token; bench-moe (D 512, F 1024, L 8): N_active = 47,874,048, forward = 99.94M
(DESIGN.md: 12.13M / 25.3M and 47.87M / 99.9M). For decoding, FLOPs are not reported (a step is bound by
reading the weights and by per-step overheads, not by matmul throughput).

The dense backend computes all E experts for every token (E/k times the expert FLOPs above) and the capacity
backends compute `capacity_factor` times them; "% of peak" still uses the model FLOPs above, so it measures
useful work per second, as MFU does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# Threads: XLA's CPU backend uses every core by default; torch is set to os.cpu_count() below (--torch-threads).
# Both libraries keep their own thread pools in this one process; they never run at the same time here.
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import mixtral_jax
from bench.timing import median_seconds
from mixtral_jax import MixtralConfig
from mixtral_jax.model.flops import flop_counts
from mixtral_jax.model.generation import SamplingConfig, generate

BATCH, SEQ = 4, 256
PROMPT, NEW_TOKENS = 32, 64

# name -> our implementation overrides
BACKENDS = {
    "dense": dict(moe_backend="dense"),
    "dropless-blocked": dict(moe_backend="dropless", grouped_matmul="blocked"),
    "dropless-ragged": dict(moe_backend="dropless", grouped_matmul="ragged_dot"),
    "capacity-1.25": dict(moe_backend="capacity", capacity_factor=1.25),
    "capacity-2.0": dict(moe_backend="capacity", capacity_factor=2.0),
}
BACKEND_GROUPS = {
    "dense": ["dense"],
    "dropless": ["dropless-blocked", "dropless-ragged"],
    "capacity": ["capacity-1.25", "capacity-2.0"],
}
DEFAULT_BACKEND = "dropless-blocked"  # the library's default (moe_backend dropless, grouped_matmul blocked)


# ------------------------------------------------------------------------------------------------ timing
def _alternate(fn_a, fn_b, repeats: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        fn_a()
        fn_b()
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn_a()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn_b()
        b.append(time.perf_counter() - t0)
    return a, b


def measure_peak(n: int = 2048, repeats: int = 7) -> dict:
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    y = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    jax_t = median_seconds(lambda: mm(x, y).block_until_ready(), repeats, warmup=2)
    tx, ty = torch.randn(n, n), torch.randn(n, n)
    torch_t = median_seconds(lambda: torch.mm(tx, ty), repeats, warmup=2)
    flops = 2 * n**3
    return {"matmul": f"{n}x{n}x{n} fp32", "jax_flops_per_s": flops / jax_t, "torch_flops_per_s": flops / torch_t,
            "jax_seconds": jax_t, "torch_seconds": torch_t}


# ------------------------------------------------------------------------------------------------ models
def build_hf(cfg: MixtralConfig, seed: int):
    torch.manual_seed(seed)
    hf_config = transformers.MixtralConfig(**cfg.to_hf())
    model = transformers.MixtralForCausalLM(hf_config).to(torch.float32).eval()
    return model


def load_ours(directory: str, overrides: dict):
    return mixtral_jax.from_pretrained(directory, dtype="float32", **overrides)


def make_forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids).logits

    return forward, state


def make_dropped(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).dropped_tokens), state


# ------------------------------------------------------------------------------------------------ one config
@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The choices every config's run shares, and the measured peak the "% of peak" figures divide by."""
    backends: list[str]
    repeats: int
    all_decode: bool
    breakdown: bool
    decode_batch: int
    seed: int
    peak: float         # JAX fp32 matmul FLOP/s


@dataclasses.dataclass(frozen=True)
class _Workload:
    """One config's transformers model and the random tokens both programs get (torch and JAX copies)."""
    cfg: MixtralConfig
    hf: transformers.MixtralForCausalLM
    ids_torch: torch.Tensor       # [BATCH, SEQ], the forward batch
    ids_jax: jax.Array
    prompt_torch: torch.Tensor    # [decode_batch, PROMPT], the decoding prompt
    prompt_jax: jax.Array
    hf_logits: np.ndarray         # transformers' logits on the forward batch, to compare ours with

    def hf_forward(self):
        with torch.no_grad():
            return self.hf(input_ids=self.ids_torch, use_cache=False).logits

    def hf_generate(self):
        with torch.no_grad():
            return self.hf.generate(self.prompt_torch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)


def _workload(cfg: MixtralConfig, settings: BenchSettings) -> _Workload:
    hf = build_hf(cfg, settings.seed)
    rng = np.random.default_rng(settings.seed)
    ids_np = rng.integers(0, cfg.vocab_size, (BATCH, SEQ), dtype=np.int64)
    prompt_np = rng.integers(0, cfg.vocab_size, (settings.decode_batch, PROMPT), dtype=np.int64)
    ids_t = torch.from_numpy(ids_np)
    with torch.no_grad():
        hf_logits = hf(input_ids=ids_t, use_cache=False).logits.numpy()
    return _Workload(cfg, hf, ids_t, jnp.asarray(ids_np, jnp.int32), torch.from_numpy(prompt_np),
                     jnp.asarray(prompt_np, jnp.int32), hf_logits)


def bench_config(name: str, settings: BenchSettings) -> dict:
    cfg = MixtralConfig.from_preset(name)
    flops = flop_counts(cfg, SEQ)
    print(f"\n== {name}: {flops['active_params'] / 1e6:.2f}M active parameters, "
          f"{flops['forward_flops_per_token'] / 1e6:.2f}M forward FLOPs/token", file=sys.stderr)
    work = _workload(cfg, settings)
    result = {"config": name, "model": {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "num_local_experts", "num_experts_per_tok")},
        "flops": flops, "transformers_impl": {"attention": work.hf.config._attn_implementation,
                                              "experts": getattr(work.hf.config, "_experts_implementation", None)},
        "forward": {}, "decode": {}}

    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as directory:
        work.hf.save_pretrained(directory)
        for backend in settings.backends:
            model = load_ours(directory, BACKENDS[backend])
            result["forward"][backend] = _bench_forward(model, work, settings, backend)
            if settings.all_decode or backend == DEFAULT_BACKEND:
                result["decode"][backend] = _bench_decode(model, work, settings, backend)
            if settings.breakdown and backend == (DEFAULT_BACKEND if DEFAULT_BACKEND in settings.backends
                                                  else settings.backends[0]):
                result["breakdown"] = component_breakdown(model, work, settings, backend)
    return result


def _bench_forward(model, work: _Workload, settings: BenchSettings, backend: str) -> dict:
    """Our jitted forward against transformers', alternated; also how far our logits are from theirs and how
    many assignments the backend dropped."""
    cfg, tokens = work.cfg, BATCH * SEQ
    fpt = flop_counts(cfg, SEQ)["forward_flops_per_token"]
    forward, state = make_forward(model)
    t0 = time.perf_counter()
    logits = np.asarray(forward(state, work.ids_jax).block_until_ready())
    compile_s = time.perf_counter() - t0
    max_diff = float(np.max(np.abs(logits - work.hf_logits)))
    dropped_fn, dstate = make_dropped(model)
    dropped = int(dropped_fn(dstate, work.ids_jax))
    ours_t, hf_t = _alternate(lambda: forward(state, work.ids_jax).block_until_ready(), work.hf_forward,
                              settings.repeats)
    ours_med, hf_med = statistics.median(ours_t), statistics.median(hf_t)
    row = {
        "overrides": BACKENDS[backend],
        "ours_tokens_per_s": tokens / ours_med, "transformers_tokens_per_s": tokens / hf_med,
        "ratio": hf_med / ours_med,
        "ours_frac_peak": tokens * fpt / ours_med / settings.peak,
        "transformers_frac_peak": tokens * fpt / hf_med / settings.peak,
        "ours_seconds": ours_t, "transformers_seconds": hf_t, "first_call_seconds": compile_s,
        "max_abs_logit_diff": max_diff, "dropped_assignments": dropped,
        "assignments": tokens * cfg.num_experts_per_tok * cfg.num_hidden_layers,
    }
    print(f"  forward {backend:17s} ours {row['ours_tokens_per_s']:8.0f} tok/s  transformers "
          f"{row['transformers_tokens_per_s']:8.0f} tok/s  ratio {row['ratio']:.2f}  "
          f"max|dlogits| {max_diff:.2e}  dropped {dropped}", file=sys.stderr)
    return row


def _bench_decode(model, work: _Workload, settings: BenchSettings, backend: str) -> dict:
    """Greedy decoding, ours against transformers' generate, alternated; and whether the tokens agree."""
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    t0 = time.perf_counter()
    ours_tokens = generate(model, work.prompt_jax, sampling=sampling, eos_token_id=-1)
    first_s = time.perf_counter() - t0
    hf_tokens = work.hf_generate()[:, PROMPT:].numpy()
    same = bool(np.array_equal(ours_tokens, hf_tokens))
    first_diff = None if same else int(np.argmax(np.any(ours_tokens != hf_tokens, axis=0)))
    ours_d, hf_d = _alternate(lambda: generate(model, work.prompt_jax, sampling=sampling, eos_token_id=-1),
                              work.hf_generate, max(3, settings.repeats), warmup=1)
    new = settings.decode_batch * NEW_TOKENS
    row = {
        "batch": settings.decode_batch, "prompt": PROMPT, "new_tokens": NEW_TOKENS,
        "ours_new_tokens_per_s": new / statistics.median(ours_d),
        "transformers_new_tokens_per_s": new / statistics.median(hf_d),
        "ratio": statistics.median(hf_d) / statistics.median(ours_d),
        "ours_seconds": ours_d, "transformers_seconds": hf_d, "first_call_seconds": first_s,
        "tokens_identical": same, "first_differing_step": first_diff,
    }
    print(f"  decode  {backend:17s} ours {row['ours_new_tokens_per_s']:8.1f} new tok/s  transformers "
          f"{row['transformers_new_tokens_per_s']:8.1f}  ratio {row['ratio']:.2f}  "
          f"identical {same}", file=sys.stderr)
    return row


# ------------------------------------------------------------------------------------------------ breakdown
ROUTER_PART = "moe router+top-k (1 layer)"  # ours alone: transformers has no separate router call to time


def component_breakdown(model, work: _Workload, settings: BenchSettings, backend: str) -> dict:
    """Times one decoder layer's attention and MoE block, and the final norm + LM head, ours against
    transformers' modules, on the same [4, 256, D] hidden states (ours jitted, theirs under no_grad)."""
    print(f"  breakdown ({backend})", file=sys.stderr)
    cfg = work.cfg
    flops = flop_counts(cfg, SEQ)["per_token"]
    layers = cfg.num_hidden_layers
    tokens = BATCH * SEQ
    x_np = np.random.default_rng(1).standard_normal((BATCH, SEQ, cfg.hidden_size)).astype(np.float32)
    ours = _our_components(model, jnp.asarray(x_np))
    theirs = _their_components(work.hf, torch.from_numpy(x_np))
    part_flops = {
        "attention (1 layer)": (flops["attention_projections"] + flops["attention_scores"]) / layers,
        "moe block (1 layer)": (flops["router"] + flops["experts_topk"]) / layers,
        "norm + lm head": flops["lm_head"],
    }
    out = {"backend": backend, "parts": {}}
    for part, fpt in part_flops.items():
        ours_t, hf_t = _alternate(ours[part], theirs[part], max(5, settings.repeats))
        o, t = statistics.median(ours_t), statistics.median(hf_t)
        out["parts"][part] = {"ours_ms": o * 1e3, "transformers_ms": t * 1e3, "ratio": t / o,
                              "ours_frac_peak": tokens * fpt / o / settings.peak,
                              "transformers_frac_peak": tokens * fpt / t / settings.peak,
                              "times_per_forward": layers if "1 layer" in part else 1}
    o = median_seconds(ours[ROUTER_PART], max(5, settings.repeats))
    out["parts"][ROUTER_PART] = {"ours_ms": o * 1e3, "transformers_ms": None, "ratio": None,
                                 "ours_frac_peak": tokens * flops["router"] / layers / o / settings.peak,
                                 "transformers_frac_peak": None, "times_per_forward": layers}
    for part, row in out["parts"].items():
        print(f"    {part:28s} ours {row['ours_ms']:8.2f} ms  transformers "
              f"{row['transformers_ms'] if row['transformers_ms'] is None else round(row['transformers_ms'], 2)} ms",
              file=sys.stderr)
    return out


def _our_components(model, x: jax.Array) -> dict:
    """Calls that run, jitted and to completion, one piece of our model on hidden states x: layer 0's
    attention, MoE block and router + top-k (a sub-part of the MoE block), and the final norm + LM head."""
    from mixtral_jax.model.attention import visibility
    from mixtral_jax.model.moe import route

    layers_graph, layers_state = nnx.split(model.layers)
    layer0_state = jax.tree.map(lambda a: a[0], layers_state)
    head_state = nnx.state(model)
    model_graph = nnx.graphdef(model)
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))
    segments = jnp.ones((BATCH, SEQ), jnp.int32)
    mask = visibility(positions, segments, segments, model.config.sliding_window)

    @jax.jit
    def attn(state, x):
        layer = nnx.merge(layers_graph, state)
        return layer.self_attn(x, positions, mask)[0]

    @jax.jit
    def moe(state, x):
        layer = nnx.merge(layers_graph, state)
        return layer.block_sparse_moe(x)[0]

    @jax.jit
    def head(state, x):
        m = nnx.merge(model_graph, state)
        return jnp.einsum("btd,dv->btv", m.norm(x), m.lm_head[...])

    @jax.jit
    def router_only(state, x):
        layer = nnx.merge(layers_graph, state)
        logits = jnp.einsum("bsd,de->bse", x, layer.block_sparse_moe.gate[...], preferred_element_type=jnp.float32)
        return route(logits, model.config.num_experts_per_tok)

    return {"attention (1 layer)": lambda: attn(layer0_state, x).block_until_ready(),
            "moe block (1 layer)": lambda: moe(layer0_state, x).block_until_ready(),
            "norm + lm head": lambda: head(head_state, x).block_until_ready(),
            ROUTER_PART: lambda: jax.block_until_ready(router_only(layer0_state, x))}


def _their_components(hf, x: torch.Tensor) -> dict:
    """The same pieces of transformers' model, under no_grad (no router: it runs inside the MoE block)."""
    layer = hf.model.layers[0]
    positions = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    with torch.no_grad():
        rope = hf.model.rotary_emb(x, positions)

    def attention():
        with torch.no_grad():
            return layer.self_attn(x, position_embeddings=rope, attention_mask=None)[0]

    def moe():
        with torch.no_grad():
            return layer.mlp(x)

    def head():
        with torch.no_grad():
            return hf.lm_head(hf.model.norm(x))

    return {"attention (1 layer)": attention, "moe block (1 layer)": moe, "norm + lm head": head}


# ------------------------------------------------------------------------------------------------ report
def machine_info(torch_threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import flax
    import jaxlib
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "numpy": np.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch_threads, "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_at_start": os.getloadavg(),
    }


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def markdown(report: dict) -> str:
    m, peak = report["machine"], report["peak"]
    lines = [f"# mixtral-jax vs transformers ({m['date']})", "",
             f"{m['cpu']}, {m['nproc']} cores; jax {m['jax']}, flax {m['flax']}, torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers']}; repeats {report['repeats']}.",
             f"Load average (1, 5, 15 min) at start {_load(m['loadavg_at_start'])}, at end {_load(m['loadavg_at_end'])}"
             " (this process adds about 1-2 while it runs; more means other work shared the CPU).",
             f"fp32 matmul peak ({peak['matmul']}): JAX {peak['jax_flops_per_s'] / 1e9:.1f} GFLOP/s "
             f"(the % of peak below), torch {peak['torch_flops_per_s'] / 1e9:.1f} GFLOP/s.", ""]
    for r in report["results"]:
        f = r["flops"]
        lines += [f"## {r['config']}: {f['active_params'] / 1e6:.2f}M active parameters, "
                  f"{f['forward_flops_per_token'] / 1e6:.2f}M forward FLOPs/token "
                  f"(transformers attention={r['transformers_impl']['attention']}, "
                  f"experts={r['transformers_impl']['experts']})", "",
                  f"Forward, batch {BATCH} x {SEQ}, median tokens/s:", "",
                  "| backend | ours tok/s | transformers tok/s | ours / transformers | ours % peak "
                  "| transformers % peak | max abs logit diff | dropped assignments | ours first call s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in r["forward"].items():
            lines.append(f"| {name} | {row['ours_tokens_per_s']:,.0f} | {row['transformers_tokens_per_s']:,.0f} "
                         f"| {row['ratio']:.2f} | {100 * row['ours_frac_peak']:.1f}% "
                         f"| {100 * row['transformers_frac_peak']:.1f}% | {row['max_abs_logit_diff']:.1e} "
                         f"| {row['dropped_assignments']} / {row['assignments']} | {row['first_call_seconds']:.1f} |")
        if r["decode"]:
            lines += ["", f"Greedy decoding, prompt {PROMPT}, {NEW_TOKENS} new tokens, median new tokens/s:", "",
                      "| backend | batch | ours new tok/s | transformers new tok/s | ours / transformers "
                      "| tokens identical | ours first call s |", "|---|---:|---:|---:|---:|---|---:|"]
            for name, row in r["decode"].items():
                same = "yes" if row["tokens_identical"] else f"no (from step {row['first_differing_step']})"
                lines.append(f"| {name} | {row['batch']} | {row['ours_new_tokens_per_s']:,.1f} "
                             f"| {row['transformers_new_tokens_per_s']:,.1f} | {row['ratio']:.2f} | {same} "
                             f"| {row['first_call_seconds']:.1f} |")
        if "breakdown" in r:
            b = r["breakdown"]
            lines += ["", f"Components (ours with {b['backend']}), one call on [{BATCH}, {SEQ}, D], median ms:", "",
                      "| part | ours ms | transformers ms | ours / transformers | ours % peak "
                      "| transformers % peak | calls per forward |", "|---|---:|---:|---:|---:|---:|---:|"]
            for part, row in b["parts"].items():
                t = "-" if row["transformers_ms"] is None else f"{row['transformers_ms']:.2f}"
                ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
                tp = "-" if row["transformers_frac_peak"] is None else f"{100 * row['transformers_frac_peak']:.1f}%"
                lines.append(f"| {part} | {row['ours_ms']:.2f} | {t} | {ratio} | {100 * row['ours_frac_peak']:.1f}% "
                             f"| {tp} | {row['times_per_forward']} |")
        lines.append("")
    return "\n".join(lines)


def parse_backends(text: str) -> list[str]:
    names = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item in BACKEND_GROUPS:
            names += BACKEND_GROUPS[item]
        elif item in BACKENDS:
            names.append(item)
        else:
            raise SystemExit(f"--backends: unknown backend '{item}' "
                             f"(known: {', '.join([*BACKEND_GROUPS, *BACKENDS])})")
    return list(dict.fromkeys(names))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench-tiny", choices=["bench-tiny", "bench-moe", "both"])
    parser.add_argument("--backends", default="dense,dropless,capacity",
                        help="comma list of dense, dropless, capacity (groups) or " + ", ".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_out", default=None)
    parser.add_argument("--all-decode", action="store_true", help="time decoding for every backend")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time attention, MoE block and LM head alone (ours vs transformers)")
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting: other processes share the CPU, "
              "absolute figures will be low (ratios of the alternated runs are more robust)", file=sys.stderr)
    backends = parse_backends(args.backends)
    configs = ["bench-tiny", "bench-moe"] if args.config == "both" else [args.config]
    peak = measure_peak()
    print(f"peak: JAX {peak['jax_flops_per_s'] / 1e9:.1f} GFLOP/s, torch {peak['torch_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s", file=sys.stderr)
    report = {"machine": machine_info(args.torch_threads), "peak": peak, "repeats": args.repeats,
              "backends": backends, "results": []}
    settings = BenchSettings(backends, args.repeats, args.all_decode, args.breakdown, args.decode_batch, args.seed,
                             peak["jax_flops_per_s"])
    for name in configs:
        report["results"].append(bench_config(name, settings))
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    print(markdown(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
