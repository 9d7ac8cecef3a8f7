"""Training-step speed and memory of our Mixtral against transformers (+ peft, + bitsandbytes), each program
in a fresh process of its own.

    mixtral-jax bench train --config bench-tiny|bench-moe --mode full|lora|qlora [--steps 8] [--batch 4]
                            [--seq 256] [--moe-backend dropless] [--breakdown]
    python -m bench.bench_train --compare [--configs bench-tiny,bench-moe] [--modes full,lora,qlora]
                                [--steps 8] [--reps 3] [--json OUT]

What runs (fp32 compute and parameters, random tokens, labels = the inputs, a new batch every step):

* Ours (`mixtral-jax bench train`): `Mixtral(config, lora=...)`, `train.step.make_train_step` on a one-device
  mesh, the trainer's optimizer `train.optim.make_optimizer` (AdamW lr 1e-4, weight decay 0.1, global-norm
  clipping at 1.0, warmup-cosine schedule). full: every parameter trained; lora: `LoraConfig(rank 64,
  alpha 128, dropout 0)` on q, k, v, o, w1, w2, w3 and the router, only the `LoRAParam`s trained; qlora: the
  same after `quantize_base` (NF4 base, experts included).
* Reference (`python -m bench.bench_train --reference ...`, used by --compare): transformers'
  `MixtralForCausalLM` from the same preset (`to_hf()`), train mode, `torch.optim.AdamW(lr 1e-4, weight decay
  0.1)`, `loss = model(ids, labels=ids, output_router_logits=True).loss` (LM loss + 0.02 x aux), backward,
  step, `zero_grad`; `torch.set_num_threads(os.cpu_count())`. lora: peft LoRA r 64, alpha 128, dropout 0 on
  target_modules q_proj, k_proj, v_proj, o_proj, gate (the router, `mlp.gate`) and target_parameters
  `mlp.experts.gate_up_proj`, `mlp.experts.down_proj` (transformers 5's fused experts: one adapter over w1|w3
  together, so peft trains fewer adapter parameters than our separate w1 and w3 adapters). qlora: the same
  peft adapters over `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32))`, which quantises only the nn.Linear layers
  (q, k, v, o): the fused experts and the router stay fp32 there. The checkpoint it loads is written by a
  helper process first, so that building the fp32 model does not count in the reference's memory.

Reported per program: tokens/s = batch x seq / the median step time over the steps after the first (the
first compiles ours; it also allocates torch's optimizer state), the first step's time, peak RSS (the
process's high-water mark over the whole run: imports, model, compile, steps), and the peak RSS of the timed
steps alone (the high-water mark reset after the first step, via /proc/self/clear_refs; in practice equal
to the whole-run peak, as neither allocator returns freed pages to the system). Neither child imports
the other framework (importing torch + transformers + peft costs ~430 MB of RSS, jax ~160 MB).

MFU = tokens/s x model training FLOPs per token / the fp32 matmul peak. Model FLOPs per token =
`mixtral_jax.model.flops.flop_counts(config, seq)["train_flops_per_token"]` (6 N + attention, N the active
parameters, the frozen base's weight gradients counted even though LoRA skips them), plus for lora/qlora the
adapters' 6 r (in + out) per adapted weight and token (top-k experts' adapters) in our layout; both programs
are credited with the same FLOPs. The peak is the median rate of a 2048^3 fp32 matmul measured inside each
process for its own framework (ours: jitted JAX, as bench_model measures it; reference: torch.mm with the
reference's threads), so a busy machine lowers both the numerator and the denominator of a run alike.

--compare alternates the two programs (ours first in odd repetitions, the reference first in even ones) and
takes medians over the repetitions. The machines are shared: check `cat /proc/loadavg` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import median_seconds

# Only the standard library at module level: each child process imports its own framework, never the other's.

MODES = ("full", "lora", "qlora")
CONFIGS = ("bench-tiny", "bench-moe")
LORA_RANK, LORA_ALPHA = 64, 128.0
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.1
REFERENCE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate"]
REFERENCE_TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PEAK_N, PEAK_REPEATS = 2048, 7


# ------------------------------------------------------------------------------------------------ memory
def maxrss_mb() -> float:
    """The process's RSS high-water mark (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float | None:
    """The address space's RSS high-water mark (VmHWM), which /proc/self/clear_refs resets. (ru_maxrss also
    keeps the mark recorded whenever a thread exits, so it does not fall after a reset in a threaded process.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Resets the high-water mark to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssPeaks:
    """Whole-run peak and the peak of the timed steps alone."""

    def __init__(self):
        self.before_reset = None
        self.reset_ok = False

    def start_timed(self):
        self.before_reset = maxrss_mb()
        self.reset_ok = reset_rss_peak()

    def result(self) -> dict:
        steps = vm_hwm_mb() if self.reset_ok else None
        return {"peak_rss_mb": max(self.before_reset or 0.0, maxrss_mb(), steps or 0.0),
                "steps_peak_rss_mb": steps}


def lora_train_flops_per_token(cfg, rank: int = LORA_RANK) -> int:
    """6 r (in + out) per adapted weight and token, our layout (separate w1, w3, w2; top-k experts)."""
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    q_out = cfg.num_attention_heads * cfg.resolved_head_dim
    kv_out = cfg.num_key_value_heads * cfg.resolved_head_dim
    per_layer = (d + q_out) + 2 * (d + kv_out) + (q_out + d) + (d + e) + k * 3 * (d + f)
    return 6 * rank * per_layer * cfg.num_hidden_layers


def model_train_flops_per_token(cfg, seq: int, mode: str) -> int:
    from mixtral_jax.model.flops import flop_counts

    flops = flop_counts(cfg, seq)["train_flops_per_token"]
    return flops + (lora_train_flops_per_token(cfg) if mode != "full" else 0)


# ------------------------------------------------------------------------------------------------ helpers
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def jax_matmul_peak() -> float:
    from mixtral_jax.model.flops import measure_matmul_peak

    return measure_matmul_peak(PEAK_N, PEAK_REPEATS)


def _our_peak(peak_tflops: float | None) -> tuple[float, str]:
    """The stated peak, else a known accelerator's bf16 data-sheet peak, else the measured fp32 matmul."""
    import jax

    from mixtral_jax.model.flops import chip_peak_flops

    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    chip = chip_peak_flops(jax.devices()[0])
    if chip:
        return chip, f"{jax.devices()[0].device_kind} bf16 data sheet"
    return jax_matmul_peak(), f"jax jit {PEAK_N}^3 fp32 matmul"


def torch_matmul_peak() -> float:
    import torch

    x, y = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    seconds = median_seconds(lambda: torch.mm(x, y), PEAK_REPEATS, warmup=2)
    return 2 * PEAK_N**3 / seconds


def _summary(step_times: list[float], first: float, tokens: int) -> dict:
    med = statistics.median(step_times)
    return {"tokens_per_s": tokens / med, "step_ms": 1e3 * med, "step_ms_all": [1e3 * t for t in step_times],
            "first_step_s": first, "compile_s": max(first - med, 0.0)}


@dataclasses.dataclass
class _StepTimes:
    losses: list
    times: list         # seconds of each timed step
    first: float        # seconds of step 0 (ours compiles in it)
    phases: list        # per timed step, the phases' seconds where the program times them (the reference)
    memory: dict        # RssPeaks.result()


def _run_steps(one_step, steps: int, tokens: int, first_note: str) -> _StepTimes:
    """Step 0 and `steps` timed steps, each logged; the timed steps' RSS peak starts after step 0.
    `one_step()` -> (loss, seconds, phases)."""
    rss = RssPeaks()
    losses, times, phases, first = [], [], [], None
    for i in range(steps + 1):
        loss, seconds, step_phases = one_step()
        losses.append(loss)
        if i == 0:
            first = seconds
            rss.start_timed()
        else:
            times.append(seconds)
            phases.append(step_phases)
        _log(f"  step {i}/{steps}: {seconds * 1e3:8.1f} ms  loss {loss:.4f}"
             + (first_note if i == 0 else f"  {tokens / seconds:7.0f} tok/s"))
    return _StepTimes(losses, times, first, phases, rss.result())


# ------------------------------------------------------------------------------------------------ ours
def run_ours(args) -> dict:
    """`mixtral-jax bench train`: our step alone; progress on stderr, the JSON result as the last stdout line."""
    t_start = time.perf_counter()
    from mixtral_jax.config import MixtralConfig, parse_overrides
    from mixtral_jax.kernels import select as kernels

    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    overrides = {"moe_backend": args.moe_backend, **parse_overrides(args.overrides)}
    cfg = MixtralConfig.from_preset(args.config, overrides)
    tokens = args.batch * args.seq
    load_start = os.getloadavg()
    _log(f"bench train (ours): {args.config} {args.mode}, batch {args.batch} x {args.seq}, {args.steps} steps + 1, "
         f"moe_backend {cfg.moe_backend}, load {os.getloadavg()[0]:.2f}")
    peak, peak_source = _our_peak(getattr(args, "peak_tflops", None))
    _log(f"  peak for MFU: {peak / 1e9:.1f} GFLOP/s ({peak_source})")
    training = _our_training(cfg, args)
    next_batch = _random_batches(cfg.vocab_size, args)
    steps = _run_steps(lambda: training.train_step(next_batch()), args.steps, tokens, first_note="  (compiles)")
    flops_per_token = model_train_flops_per_token(cfg, args.seq, args.mode)
    result = {
        "program": "mixtral-jax", "config": args.config, "mode": args.mode, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "moe_backend": cfg.moe_backend,
        "grouped_matmul": kernels.grouped_matmul_kind(cfg.grouped_matmul),
        "attention": kernels.attention_implementation(cfg.attention_implementation, cfg.dtype),
        **_summary(steps.times, steps.first, tokens), **steps.memory,
        "peak_flops_per_s": peak, "peak_source": peak_source,
        "train_flops_per_token": flops_per_token,
        "trainable_params": int(training.trainable_params),
        "frozen_base_bytes": int(training.frozen_base_bytes) if args.mode != "full" else 0,
        "setup_s": training.setup_s, "losses": steps.losses, "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t_start,
    }
    result["mfu"] = result["tokens_per_s"] * flops_per_token / peak
    if args.breakdown:
        result["breakdown"] = _ours_breakdown(training, next_batch(), args.steps)
    print(json.dumps(result), flush=True)
    return result


@dataclasses.dataclass
class _OurTraining:
    """The jitted step and the state it carries from step to step, which the breakdown reuses after the run."""
    step: object
    optimizer: object
    params: object
    opt_state: object
    frozen: object
    setup_s: float
    trainable_params: int
    frozen_base_bytes: int

    def train_step(self, batch: dict) -> tuple[float, float, None]:
        """(loss, seconds, no phases: the step is jitted whole)."""
        import jax

        extra = _no_dropout(self.step)
        t0 = time.perf_counter()
        self.params, self.opt_state, metrics = self.step.step(self.params, self.opt_state, batch, self.frozen, *extra)
        jax.block_until_ready((self.params, self.opt_state, metrics))
        seconds = time.perf_counter() - t0
        return float(metrics["loss"]), seconds, None


def _random_batches(vocab_size: int, args):
    """A new batch of random tokens per call (labels = the inputs), the same sequence for every run of a seed."""
    import numpy as np

    rng = np.random.default_rng(args.seed)

    def next_batch():
        ids = rng.integers(0, vocab_size, (args.batch, args.seq), dtype=np.int32)
        return {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}

    return next_batch


def _our_training(cfg, args) -> _OurTraining:
    """The model as the mode asks (LoRA adapters; an NF4 base for qlora), the trainer's optimizer and the
    one-device train step, set up and timed."""
    import jax
    from flax import nnx

    from mixtral_jax.model.lora import LoraConfig, LoRAParam
    from mixtral_jax.model.nf4_base import base_nbytes, quantize_base
    from mixtral_jax.model.transformer import Mixtral
    from mixtral_jax.parallel.sharding import make_mesh
    from train.optim import OptimizerConfig, make_optimizer
    from train.step import make_train_step

    t0 = time.perf_counter()
    lora = LoraConfig(rank=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0) if args.mode != "full" else None
    model = Mixtral(cfg, rngs=nnx.Rngs(args.seed), lora=lora)
    if args.mode == "qlora":
        model = quantize_base(model)
    base_bytes, base_params = base_nbytes(model)
    trainable = nnx.Param if args.mode == "full" else LoRAParam
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY),
                               total_steps=args.steps + 1)
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    step = make_train_step(model, optimizer, mesh, (args.batch, args.seq), trainable=trainable)
    params, frozen = step.split(model)
    del model
    opt_state = step.init_opt_state(params)
    jax.block_until_ready((params, opt_state, frozen))
    setup_s = time.perf_counter() - t0
    n_trainable = sum(x.size for x in jax.tree.leaves(params))
    _log(f"  setup {setup_s:.1f} s: {n_trainable / 1e6:.2f}M trainable parameters"
         + (f", frozen base {base_bytes / 2**20:.1f} MiB for {base_params / 1e6:.2f}M parameters"
            if args.mode != "full" else ""))
    return _OurTraining(step, optimizer, params, opt_state, frozen, setup_s, n_trainable, base_bytes)


def _no_dropout(step) -> tuple:
    """The step's dropout key: None, LoRA dropout off, as in the reference."""
    return (None,)


def _ours_breakdown(training: _OurTraining, batch, repeats: int) -> dict:
    """Forward alone (step.evaluate), forward + backward alone (step.grads) and the optimizer alone (clip +
    AdamW update + apply, jitted with the step's shardings), median ms after one compiling call each; and the
    compiled step's memory analysis (arguments, outputs, temporaries)."""
    import jax
    import optax

    step, optimizer, frozen = training.step, training.optimizer, training.frozen
    params, opt_state = training.params, training.opt_state
    _log("  breakdown: forward, forward+backward, optimizer")
    repeats = max(3, repeats)
    fwd = median_seconds(lambda: jax.block_until_ready(step.evaluate(params, batch, frozen)), repeats)
    extra = _no_dropout(step)
    fwd_bwd = median_seconds(lambda: jax.block_until_ready(step.grads(params, batch, frozen, *extra)), repeats)
    grads, _ = step.grads(params, batch, frozen, *extra)
    memory = step.step.lower(params, opt_state, batch, frozen, *extra).compile().memory_analysis()
    compiled = {name: getattr(memory, f"{name}_size_in_bytes", None) for name in ("argument", "output", "alias", "temp")}

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, in_shardings=(step.param_shardings, step.opt_shardings, step.param_shardings),
                     out_shardings=(step.param_shardings, step.opt_shardings), donate_argnums=(0, 1))
    state = {"p": params, "o": opt_state}

    def run_update():
        state["p"], state["o"] = update(state["p"], state["o"], grads)
        jax.block_until_ready((state["p"], state["o"]))

    opt = median_seconds(run_update, repeats)
    out = {"forward_ms": 1e3 * fwd, "forward_backward_ms": 1e3 * fwd_bwd, "optimizer_ms": 1e3 * opt}
    _log("  " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()))
    out["step_compiled_mb"] = {k: None if v is None else v / 2**20 for k, v in compiled.items()}
    _log("  compiled step (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in out["step_compiled_mb"].items()
                                                if v is not None))
    return out


# ------------------------------------------------------------------------------------------------ reference
def _standalone_config():
    """mixtral_jax/config.py loaded by path, without running mixtral_jax/__init__ (which imports jax)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "mixtral_jax" / "config.py"
    spec = importlib.util.spec_from_file_location("_mixtral_jax_config_standalone", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def preset_hf_config(name: str) -> dict:
    import yaml

    config = _standalone_config()
    preset = Path(__file__).resolve().parent.parent / "mixtral_jax" / "presets" / f"{name}.yaml"
    if not preset.is_file():
        raise SystemExit(f"unknown preset '{name}' ({preset} not found)")
    return config.MixtralConfig.from_dict(yaml.safe_load(preset.read_text()) or {}, source=f"preset {name}").to_hf()


def write_reference_checkpoint(name: str, directory: str, seed: int) -> None:
    """The transformers model of preset `name` (seeded), saved as an HF directory (a helper process)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**preset_hf_config(name)))
    model.to(torch.float32).save_pretrained(directory)


def _reference_model(args):
    import torch
    import transformers

    hf_config = transformers.MixtralConfig(**preset_hf_config(args.config))
    notes = []
    if args.mode == "qlora":
        with tempfile.TemporaryDirectory(prefix=f"bench-train-{args.config}-") as directory:
            subprocess.run([sys.executable, "-m", "bench.bench_train", "--write-reference-checkpoint", directory,
                            "--config", args.config, "--seed", str(args.seed)], check=True,
                           cwd=Path(__file__).resolve().parent.parent)
            quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.float32)
            model = transformers.MixtralForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                                    device_map="cpu", dtype=torch.float32)
        quantized = sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__})
        notes.append(f"bitsandbytes 4-bit: {', '.join(quantized) or 'no'} modules; fused experts and router fp32")
    else:
        torch.manual_seed(args.seed)
        model = transformers.MixtralForCausalLM(hf_config).to(torch.float32)
    if args.mode != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules=REFERENCE_TARGET_MODULES,
                                                 target_parameters=REFERENCE_TARGET_PARAMETERS))
    return model, notes


def run_reference(args) -> dict:
    """transformers (+ peft, + bitsandbytes) train step; progress on stderr, JSON as the last stdout line."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    tokens = args.batch * args.seq
    load_start = os.getloadavg()
    _log(f"bench train (reference): {args.config} {args.mode}, batch {args.batch} x {args.seq}, {args.steps} steps + 1,"
         f" torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    peak = torch_matmul_peak()
    _log(f"  fp32 matmul peak (torch.mm, {PEAK_N}^3): {peak / 1e9:.1f} GFLOP/s")
    t0 = time.perf_counter()
    model, notes = _reference_model(args)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    setup_s = time.perf_counter() - t0
    n_trainable = sum(p.numel() for p in trainable)
    _log(f"  setup {setup_s:.1f} s: {n_trainable / 1e6:.2f}M trainable parameters")
    steps = _run_steps(_reference_step(model, optimizer, args), args.steps, tokens, first_note="")
    result = {
        "program": "transformers" + ("+peft" if args.mode != "full" else "") + ("+bitsandbytes" if args.mode == "qlora" else ""),
        "config": args.config, "mode": args.mode, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        **_summary(steps.times, steps.first, tokens), **steps.memory,
        "peak_flops_per_s": peak, "peak_source": f"torch.mm {PEAK_N}^3 fp32, {torch.get_num_threads()} threads",
        "trainable_params": int(n_trainable), "setup_s": setup_s, "losses": steps.losses, "notes": notes,
        "breakdown": _phase_medians_ms(steps.phases),
        "versions": _reference_versions(args.mode),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t_start,
    }
    b = result["breakdown"]
    _log(f"  forward {b['forward_ms']:.1f} ms, backward {b['backward_ms']:.1f} ms, optimizer {b['optimizer_ms']:.1f} ms")
    print(json.dumps(result), flush=True)
    return result


def _reference_step(model, optimizer, args):
    """A step on a new random batch per call -> (loss, seconds, (forward, backward, optimizer) seconds)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(args.seed)

    def one_step():
        ids = torch.from_numpy(rng.integers(0, model.config.vocab_size, (args.batch, args.seq), dtype=np.int64))
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, output_router_logits=True).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return float(loss.detach()), t3 - t0, (t1 - t0, t2 - t1, t3 - t2)

    return one_step


def _phase_medians_ms(phases: list) -> dict:
    return {"forward_ms": 1e3 * statistics.median(p[0] for p in phases),
            "backward_ms": 1e3 * statistics.median(p[1] for p in phases),
            "optimizer_ms": 1e3 * statistics.median(p[2] for p in phases)}


def _reference_versions(mode: str) -> dict:
    import peft
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if mode == "qlora":
        import bitsandbytes

        versions["bitsandbytes"] = bitsandbytes.__version__
    return versions


# ------------------------------------------------------------------------------------------------ compare
def _run_child(argv: list[str], label: str, timeout: float) -> dict:
    """Runs one program in a fresh process; its stderr passes through, its last stdout line is the JSON."""
    root = Path(__file__).resolve().parent.parent
    _log(f"\n$ {' '.join(argv[1:])}")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=root, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); stdout tail: {proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def _child_argv(kind: str, config: str, mode: str, args, breakdown: bool) -> list[str]:
    common = ["--config", config, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch),
              "--seq", str(args.seq), "--seed", str(args.seed)]
    if kind == "ours":
        argv = [sys.executable, "-m", "mixtral_jax.cli", "bench", "train", *common, "--moe-backend", args.moe_backend]
        return argv + (["--breakdown"] if breakdown else [])
    return [sys.executable, "-m", "bench.bench_train", "--reference", *common]


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _machine_info() -> dict:
    from bench.bench_model import (
        machine_info,  # the forward benchmark's description of the machine
    )

    info = machine_info(torch_threads=os.cpu_count())
    import optax
    import peft

    info.update(peft=peft.__version__, optax=optax.__version__)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # pragma: no cover - optional
        info["bitsandbytes"] = f"unavailable ({err})"
    return info


def compare(args) -> dict:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode '{m}' (known: {', '.join(MODES)})")
    load = os.getloadavg()[0]
    if load > 0.8:
        _log(f"warning: load average {load:.2f} before starting: other processes share the CPU; absolute figures "
             "will be low (the alternated ratios are more robust)")
    report = {"machine": _machine_info(), "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "reps": args.reps, "moe_backend": args.moe_backend, "results": []}
    for config in configs:
        for mode in modes:
            ours, theirs = [], []
            for rep in range(args.reps):
                order = ["ours", "theirs"] if rep % 2 == 0 else ["theirs", "ours"]
                for kind in order:
                    argv = _child_argv(kind, config, mode, args, breakdown=(kind == "ours" and rep == args.reps - 1))
                    row = _run_child(argv, f"{kind} {config} {mode}", args.timeout)
                    (ours if kind == "ours" else theirs).append(row)
                    _log(f"  -> {kind} {config} {mode} rep {rep + 1}/{args.reps}: {row['tokens_per_s']:.0f} tok/s, "
                         f"peak RSS {row['peak_rss_mb']:.0f} MB")
            report["results"].append(_summarise(config, mode, ours, theirs))
            if args.json_out:  # partial results survive an interruption
                _write_json(args.json_out, report)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    return report


def _summarise(config: str, mode: str, ours: list[dict], theirs: list[dict]) -> dict:
    peak = _median(ours, "peak_flops_per_s")
    flops = ours[0]["train_flops_per_token"]
    row = {"config": config, "mode": mode, "train_flops_per_token": flops, "peak_flops_per_s": peak,
           "torch_peak_flops_per_s": _median(theirs, "peak_flops_per_s"), "ours_runs": ours, "reference_runs": theirs}
    for side, rows in (("ours", ours), ("reference", theirs)):
        for key in ("tokens_per_s", "step_ms", "peak_rss_mb", "steps_peak_rss_mb", "first_step_s"):
            row[f"{side}_{key}"] = _median(rows, key)
        # each run against the peak its own process measured (load then affects both alike), median of runs
        row[f"{side}_mfu"] = statistics.median(r["tokens_per_s"] * flops / r["peak_flops_per_s"] for r in rows)
        row[f"{side}_trainable_params"] = rows[0]["trainable_params"]
    row["reference_program"] = theirs[0]["program"]
    row["reference_notes"] = theirs[0].get("notes", [])
    row["speed_ratio"] = row["ours_tokens_per_s"] / row["reference_tokens_per_s"]
    row["memory_ratio"] = row["ours_peak_rss_mb"] / row["reference_peak_rss_mb"]
    row["ours_breakdown"] = next((r["breakdown"] for r in reversed(ours) if "breakdown" in r), None)
    row["reference_breakdown"] = {k: statistics.median(r["breakdown"][k] for r in theirs)
                                  for k in theirs[0]["breakdown"]}
    return row


def _write_json(path: str, report: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    m = report["machine"]
    load_end = m.get("loadavg_at_end")
    lines = [
        f"# Train step: mixtral-jax vs transformers / peft ({m['date']})", "",
        f"{m['cpu']}, {m['nproc']} cores; jax {m['jax']}, flax {m['flax']}, optax {m.get('optax')}; torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, peft {m.get('peft')}, "
        f"bitsandbytes {m.get('bitsandbytes')}.",
        f"fp32, batch {report['batch']} x {report['seq']}, {report['steps']} timed steps after the first, "
        f"{report['reps']} repetitions alternated (medians); ours with moe_backend {report['moe_backend']}. "
        f"Load average at start {'/'.join(f'{v:.2f}' for v in m['loadavg_at_start'])}"
        + (f", at end {'/'.join(f'{v:.2f}' for v in load_end)}" if load_end else "") + ".",
        "MFU: model training FLOPs per token (6N + attention, + LoRA adapters for lora/qlora, the same for both) "
        "x tokens/s / the fp32 matmul peak each process measured for its own framework (ours: a jitted JAX "
        "2048^3 matmul; reference: torch.mm). Peak RSS: the whole process (imports, model, compile, steps).", "",
        "| config | mode | ours tok/s | ref tok/s | speed ours/ref | ours peak RSS MB | ref peak RSS MB "
        "| RSS ours/ref | ours MFU | ref MFU | ours 1st step s | reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in report["results"]:
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['ours_tokens_per_s']:,.0f} | {r['reference_tokens_per_s']:,.0f} "
            f"| {r['speed_ratio']:.2f} | {r['ours_peak_rss_mb']:,.0f} | {r['reference_peak_rss_mb']:,.0f} "
            f"| {r['memory_ratio']:.2f} | {100 * r['ours_mfu']:.1f}% "
            f"| {100 * r['reference_mfu']:.1f}% | {r['ours_first_step_s']:.1f} | {r['reference_program']} |")
    peaks = [r["peak_flops_per_s"] for r in report["results"]]
    tpeaks = [r["torch_peak_flops_per_s"] for r in report["results"] if r["torch_peak_flops_per_s"]]
    if peaks:
        lines += ["", f"fp32 matmul peak: JAX {min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s (median per row), "
                      f"torch.mm {min(tpeaks) / 1e9:.0f}-{max(tpeaks) / 1e9:.0f} GFLOP/s."]
    lines += ["", "Where the time goes (ms per step; ours: each part jitted alone, after the run; reference: "
                  "timed inside each step):", "",
              "| config | mode | ours step | ours fwd | ours fwd+bwd | ours optimizer | ref step | ref fwd | ref bwd "
              "| ref optimizer | trainable ours / ref |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        ob, rb = r["ours_breakdown"] or {}, r["reference_breakdown"]
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['ours_step_ms']:.0f} | {fmt(ob.get('forward_ms'), '.0f')} "
            f"| {fmt(ob.get('forward_backward_ms'), '.0f')} | {fmt(ob.get('optimizer_ms'), '.1f')} "
            f"| {r['reference_step_ms']:.0f} | {rb['forward_ms']:.0f} | {rb['backward_ms']:.0f} "
            f"| {rb['optimizer_ms']:.1f} | {r['ours_trainable_params'] / 1e6:.2f}M / "
            f"{r['reference_trainable_params'] / 1e6:.2f}M |")
    notes = sorted({n for r in report["results"] for n in r["reference_notes"]})
    if notes:
        lines += [""] + [f"Reference qlora: {n}." for n in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--compare", action="store_true", help="ours vs the PyTorch reference, alternated")
    what.add_argument("--reference", action="store_true", help="run the PyTorch reference once (a child of --compare)")
    what.add_argument("--write-reference-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="--compare: comma list of presets")
    parser.add_argument("--modes", default=",".join(MODES), help="--compare: comma list of full, lora, qlora")
    parser.add_argument("--config", default="bench-tiny", help="--reference: the preset")
    parser.add_argument("--mode", default="full", choices=MODES, help="--reference: the mode")
    parser.add_argument("--steps", type=int, default=8, help="timed steps after the first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3, help="--compare: repetitions of each pair")
    parser.add_argument("--moe-backend", default="dropless", choices=["dense", "dropless", "capacity"])
    parser.add_argument("--torch-threads", type=int, default=None, help="default: os.cpu_count()")
    parser.add_argument("--timeout", type=float, default=1800, help="--compare: seconds per child process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_out", default=None, help="--compare: also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.write_reference_checkpoint:
        write_reference_checkpoint(args.config, args.write_reference_checkpoint, args.seed)
    elif args.reference:
        run_reference(args)
    else:
        report = compare(args)
        print(markdown(report))
        if args.json_out:
            _write_json(args.json_out, report)


if __name__ == "__main__":
    main()
