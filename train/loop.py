"""A training run: the base model, the data, the jitted step, Orbax checkpoints and metrics, resumable.

A run directory that holds a checkpoint continues from it: trainable weights, optimizer state, the data
iterator's position and the RNG come back, so the losses after a resume equal an uninterrupted run's bit for
bit. SIGTERM (a preempted VM) finishes the current step, saves and exits cleanly; a non-finite loss stops the
run before anything of that step is saved, leaving the last checkpoint as it was.
"""

from __future__ import annotations

import math
import os
import signal
import time

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from mixtral_jax import checkpoint, paths, runs, texts as text_sources
from mixtral_jax.config import ConfigError
from mixtral_jax.distributed import global_batch, host_rows, initialize
from mixtral_jax.flops import chip_peak_flops, flop_counts, measure_matmul_peak
from mixtral_jax.sharding import make_mesh
from mixtral_jax.tokenizer import check_compatible, load_tokenizer
from train import data as data_lib
from train import sft
from train.config import TrainConfig
from train.metrics import MetricsLog, expert_share
from train.optim import OptimizerConfig, make_optimizer, schedule
from train.step import make_train_step

CONFIG_FILE = "config.yaml"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


def run_model_of(config: TrainConfig) -> runs.RunModel:
    lora = config.lora
    return runs.RunModel(
        base=config.model.path, dtype=config.model.dtype, quantize=config.model.quantize,
        lora=dict(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=list(lora.targets))
        if lora.enabled else None,
        modules_to_save=tuple(lora.modules_to_save) if lora.enabled else (),
        implementation=dict(config.model.implementation), lora_seed=config.seed)


def build_arrays(config: TrainConfig, sources, tokenizer, replay: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """Tokenised sequences of `sources` as equal-length arrays, and how many SFT samples were dropped. With
    `replay`, pre-training blocks of `data.replay` make up `data.replay_share` of the result."""
    data = config.data
    if data.kind == "pretrain":
        def blocks_of(source_list):
            texts = (text for source in source_list for text in text_sources.read_texts(source, data.text_field))
            return data_lib.pretrain_blocks(texts, tokenizer, data.seq_len, data.group_lines)
        blocks = blocks_of(sources)
        if replay and data.replay and data.replay_share:
            blocks = data_lib.mix_replay(blocks, blocks_of(data.replay), data.replay_share)
        return data_lib.pretrain_dataset(blocks), 0
    records = [record for source in sources for record in sft.read_alpaca(source)]
    examples, dropped = sft.build_sft(records, tokenizer, data.seq_len)
    arrange = sft.pack_examples if data.packing else sft.pad_examples
    return arrange(examples, data.seq_len, tokenizer.eos_id), dropped


def _prepare_run_dir(config: TrainConfig, run_model: runs.RunModel, writer: bool) -> None:
    """The resolved config and the model manifest; a run directory of a different model is refused."""
    if not paths.is_remote(config.run_dir):  # an object store has no directories to make
        os.makedirs(config.run_dir, exist_ok=True)
    if runs.is_run_dir(config.run_dir):
        existing = runs.read_manifest(config.run_dir)
        if existing != run_model:
            raise ConfigError(f"{os.path.join(config.run_dir, runs.MANIFEST)}: this run directory trains "
                              f"another model ({existing}); use a new run_dir")
    if writer:
        runs.write_manifest(config.run_dir, run_model)
        paths.write_text(os.path.join(config.run_dir, CONFIG_FILE),
                         yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps (a step is never cut in half)."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, the run just cannot be stopped by a signal
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _peak_flops(config: TrainConfig) -> float:
    if config.peak_tflops:
        return config.peak_tflops * 1e12
    return chip_peak_flops(jax.devices()[0]) or measure_matmul_peak()


def _evaluate(step_fn, params, frozen, arrays, batch_size: int) -> dict:
    """Mean next-token loss and perplexity over the held-out sequences, batch by batch (padded with empty rows)."""
    rows = len(arrays["input_ids"])
    nll = tokens = 0.0
    for start in range(0, rows, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        missing = batch_size - len(chunk["input_ids"])
        if missing:
            chunk = {k: np.concatenate([v, np.full((missing, v.shape[1]), -100 if k == "labels" else 0, v.dtype)])
                     for k, v in chunk.items()}
        local = {k: v[host_rows(batch_size)] for k, v in chunk.items()}
        metrics = step_fn.evaluate(params, global_batch(local, step_fn.batch_shardings, batch_size), frozen)
        nll += float(metrics["lm_loss"]) * float(metrics["tokens"])
        tokens += float(metrics["tokens"])
    loss = nll / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "eval_tokens": int(tokens)}


def train(config: TrainConfig, log=print) -> dict:
    """Runs (or resumes) the configured training; returns a summary of the run."""
    initialize()
    writer = jax.process_index() == 0
    run_model = run_model_of(config)
    _prepare_run_dir(config, run_model, writer)

    tokenizer = load_tokenizer(config.model.tokenizer, model=config.model.path)
    mesh = make_mesh(config.mesh)
    model = checkpoint.build_model(run_model, mesh)
    check_compatible(tokenizer, model.config.vocab_size, f"{config.model.path} field vocab_size")
    train_arrays, dropped = build_arrays(config, config.data.train, tokenizer, replay=True)
    eval_arrays = None
    if config.data.eval:
        eval_arrays, _ = build_arrays(config, config.data.eval, tokenizer)
        eval_arrays = {k: v[:config.data.eval_rows] for k, v in eval_arrays.items()}
    batches = data_lib.BatchIterator(train_arrays, config.batch_size, config.seed)
    total_steps = config.steps or max(1, math.floor(config.epochs * batches.steps_per_epoch))
    log(f"data: {len(train_arrays['input_ids']):,} training sequences of {config.data.seq_len} tokens"
        + (f" ({dropped:,} SFT samples dropped: the prompt alone fills data.seq_len)" if dropped else "")
        + f"; {batches.steps_per_epoch:,} steps per epoch, {total_steps:,} steps")

    opt = config.optimizer
    optimizer_config = OptimizerConfig(learning_rate=opt.learning_rate, weight_decay=opt.weight_decay,
                                       warmup_ratio=opt.warmup_ratio, total_steps=total_steps,
                                       max_grad_norm=opt.max_grad_norm, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    learning_rate = schedule(optimizer_config)
    seq_len = config.data.seq_len
    step_fn = make_train_step(model, make_optimizer(optimizer_config), mesh, (config.batch_size, seq_len),
                              trainable=run_model.trainable(), micro_batches=config.micro_batches,
                              aux_loss_coef=config.aux_loss_coef)
    model_config = model.config
    params, frozen = step_fn.split(model)
    del model
    opt_state = step_fn.init_opt_state(params)

    manager = checkpoint.open_manager(config.run_dir, config.keep_checkpoints, config.async_save)
    start, rng = 0, jax.random.key(config.seed)
    if manager.latest_step() is not None:
        start = manager.latest_step()
        params, opt_state, meta = checkpoint.restore(manager, start, params, step_fn.param_shardings,
                                                     opt_state, step_fn.opt_shardings)
        batches.restore(meta["data"])
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        log(f"resuming {config.run_dir} from step {start}")

    def save(step: int) -> None:
        t0 = time.perf_counter()
        checkpoint.save(manager, step, params, opt_state,
                        {"step": step, "data": batches.state(), "rng": jax.random.key_data(rng).tolist(),
                         "total_steps": total_steps})
        save_seconds.append(time.perf_counter() - t0)
        metrics_log.flush()  # every row up to a checkpoint is stored with it (a remote log is uploaded late)

    flops_per_token = flop_counts(model_config, seq_len)["train_flops_per_token"]
    peak = _peak_flops(config) * jax.device_count()
    metrics_log = MetricsLog(config.run_dir, start, enabled=writer)
    summary = {"run_dir": config.run_dir, "start_step": start, "total_steps": total_steps,
               "train_sequences": len(train_arrays["input_ids"]), "sft_dropped": dropped, "stopped": None}
    if eval_arrays is not None and start == 0:
        first = _evaluate(step_fn, params, frozen, eval_arrays, config.batch_size)
        metrics_log.write({"step": 0, **first})
        summary["eval_before"] = first
    save_seconds: list[float] = []
    step_seconds, step_tokens, expert_tokens = [], 0, 0
    bar = tqdm(total=total_steps, initial=start, desc="train", disable=not (config.progress and writer),
               dynamic_ncols=True)
    step = start
    try:
        with _StopFlag() as stop:
            while step < total_steps:
                batch = global_batch(next(batches), step_fn.batch_shardings, config.batch_size)
                dropout_key = jax.random.fold_in(rng, step) if run_model.lora and config.lora.dropout else None
                t0 = time.perf_counter()
                params, opt_state, metrics = step_fn.step(params, opt_state, batch, frozen, dropout_key)
                loss = float(metrics["loss"])
                if step > start:  # the first step of a process includes compiling
                    step_seconds.append(time.perf_counter() - t0)
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"step {step + 1}: the loss is {loss}; stopped without saving this step "
                                           f"(last checkpoint: step {manager.latest_step()})")
                step += 1
                step_tokens += int(metrics["tokens"])
                expert_tokens = expert_tokens + np.asarray(metrics["expert_tokens"])
                bar.update(1)
                if step % config.log_every == 0 or step == total_steps:
                    seconds = sum(step_seconds)
                    tokens_per_s = config.batch_size * seq_len * len(step_seconds) / seconds if seconds else None
                    row = {"step": step, "loss": loss, "lm_loss": float(metrics["lm_loss"]),
                           "aux_loss": float(metrics["aux_loss"]), "lr": float(learning_rate(step - 1)),
                           "grad_norm": float(metrics["grad_norm"]), "tokens": step_tokens,
                           "tokens_per_s": tokens_per_s,
                           "mfu": tokens_per_s * flops_per_token / peak if tokens_per_s else None,
                           "dropped_tokens": int(metrics["dropped_tokens"]),
                           "expert_share": expert_share(expert_tokens)}
                    metrics_log.write(row)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s or 0:,.0f}")
                    step_seconds, step_tokens, expert_tokens = [], 0, 0
                if eval_arrays is not None and config.eval_every and step % config.eval_every == 0 \
                        and step < total_steps:
                    metrics_log.write({"step": step, **_evaluate(step_fn, params, frozen, eval_arrays,
                                                                 config.batch_size)})
                if stop.raised or step == config.stop_at_step:
                    summary["stopped"] = f"{'SIGTERM' if stop.raised else 'stop_at_step'} after step {step}"
                    save(step)
                    break
                if step % config.save_every == 0 or step == total_steps:
                    save(step)
        if eval_arrays is not None and step == total_steps:
            last = _evaluate(step_fn, params, frozen, eval_arrays, config.batch_size)
            metrics_log.write({"step": step, **last})
            summary["eval_after"] = last
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        metrics_log.close()
    summary.update(end_step=step, checkpoint_start_seconds=save_seconds)
    return summary

