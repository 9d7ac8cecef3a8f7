"""A training run: the base model, the data, the jitted step, Orbax checkpoints and metrics, resumable.

A run directory that holds a checkpoint continues from it: trainable weights, optimizer state, the data
iterator's position and the RNG come back, so the losses after a resume equal an uninterrupted run's bit for
bit. SIGTERM (a preempted VM) finishes the current step, saves and exits cleanly; a non-finite loss stops the
run before anything of that step is saved, leaving the last checkpoint as it was.

One trainer at a time holds a run directory (mixtral_jax/checkpoints/run_lock.py); a newest checkpoint that
no longer restores is moved aside and the run resumes from the newest that does; what a resume may change
is train/resume.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from mixtral_jax.checkpoints import pretrained, run_lock
from mixtral_jax.checkpoints import run_manifest as runs
from mixtral_jax.checkpoints import run_state as checkpoint
from mixtral_jax.data import texts as text_sources
from mixtral_jax.data.sequences import stack
from mixtral_jax.data.tokenizer import check_compatible, load_tokenizer
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model.flops import chip_peak_flops, flop_counts, measure_matmul_peak
from mixtral_jax.parallel.distributed import global_batch, host_rows, initialize
from mixtral_jax.parallel.sharding import make_mesh
from train import data as data_lib
from train import resume
from train.config import TrainConfig
from train.metrics import MetricsLog, expert_share
from train.optim import make_optimizer, master_dtype, schedule
from train.step import TrainStep, make_train_step

CONFIG_FILE = resume.CONFIG_FILE


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is left as it was."""


def run_model_of(config: TrainConfig) -> runs.RunModel:
    """The model a run trains, as its manifest records it (the LoRA fields are the library's LoraConfig's)."""
    lora = config.lora
    return runs.RunModel(
        base=config.model.path, dtype=config.model.dtype, quantize=config.model.quantize,
        lora=lora.manifest_fields(), modules_to_save=tuple(lora.modules_to_save) if lora.enabled else (),
        implementation=dict(config.model.implementation), lora_seed=config.seed)


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


@dataclasses.dataclass
class RunData:
    """The training batches (a resumable iterator), the held-out sequences and the steps they make."""

    batches: data_lib.BatchIterator
    eval_arrays: dict[str, np.ndarray] | None
    train_sequences: int
    sft_dropped: int
    total_steps: int


def load_data(config: TrainConfig, tokenizer, log) -> RunData:
    train_rows, dropped = data_lib.load_rows(config, config.data.train, tokenizer, replay=True)
    eval_arrays = None
    if config.data.eval:
        eval_rows, _ = data_lib.load_rows(config, config.data.eval, tokenizer)
        if not len(eval_rows):
            raise text_sources.DataError(f"{', '.join(config.data.eval)}: no held-out sequence of data.seq_len "
                                         f"{config.data.seq_len} tokens")
        eval_arrays = stack(eval_rows, range(min(config.data.eval_rows, len(eval_rows))))
    sources = (*config.data.train, *(config.data.replay if config.data.replay_share else ()))
    batches = data_lib.BatchIterator(train_rows, config.batch_size, config.seed, sources=sources)
    total_steps = config.steps or max(1, math.floor(config.epochs * batches.steps_per_epoch))
    sequences = len(train_rows)
    log(f"data: {sequences:,} training sequences of {config.data.seq_len} tokens"
        + (f" ({dropped:,} SFT samples dropped: the prompt alone fills data.seq_len)" if dropped else "")
        + f"; {batches.steps_per_epoch:,} steps per epoch, {total_steps:,} steps")
    return RunData(batches, eval_arrays, sequences, dropped, total_steps)


@dataclasses.dataclass
class TrainState:
    """What the loop advances and a checkpoint holds: the step reached, the trainable weights, the optimizer
    state and the run's RNG key (each step folds its number into it)."""

    step: int
    params: Any
    opt_state: Any
    rng: jax.Array


class Checkpoints:
    """The run's Orbax checkpoints, with the data iterator's position and the RNG beside the weights; keeps how
    long each save held up the loop (an async save only starts it)."""

    def __init__(self, config: TrainConfig, step_fn: TrainStep, batches: data_lib.BatchIterator, total_steps: int):
        self.manager = checkpoint.open_manager(config.run_dir, config.keep_checkpoints, config.async_save)
        self.run_dir = config.run_dir
        self.step_fn, self.batches, self.total_steps = step_fn, batches, total_steps
        self.start_seconds: list[float] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _restore_step(self, step: int, state: TrainState) -> tuple[TrainState, dict]:
        params, opt_state, meta = checkpoint.restore(self.manager, step, state.params, self.step_fn.param_shardings,
                                                     state.opt_state, self.step_fn.opt_shardings)
        missing = [key for key in ("data", "rng") if key not in meta]
        if missing:
            raise CheckpointError(f"{checkpoint.step_path(self.run_dir, step)}: the checkpoint's meta lacks "
                                  f"'{missing[0]}'")
        rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        return TrainState(step, params, opt_state, rng), meta["data"]

    def restore(self, state: TrainState, log=print) -> TrainState:
        """The newest checkpoint that restores, `state` giving the structure; the data iterator moves to its
        place. Newer ones that fail (files deleted or truncated) are moved aside (renamed, kept) with a log
        line; when none restores, the newest's CheckpointError is raised and nothing is moved (the failure
        is then not one checkpoint's damage)."""
        failed = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored, data_state = self._restore_step(step, state)
                break
            except CheckpointError as err:
                failed.append((step, err))
        else:
            raise failed[0][1]
        for step, err in failed:
            log(f"{err}; resuming from step {restored.step}, the newest checkpoint that restores")
            self._move_aside(step, log)
        if failed:
            self.manager.reload()
        self.batches.restore(data_state)
        return restored

    def _move_aside(self, step: int, log) -> None:
        if jax.process_index() == 0:
            log(f"{checkpoint.step_path(self.run_dir, step)}: moved aside to "
                f"{checkpoint.move_aside(self.run_dir, step)} (kept; delete it once inspected)")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")

    def save(self, state: TrainState) -> None:
        t0 = time.perf_counter()
        checkpoint.save(self.manager, state.step, state.params, state.opt_state,
                        {"step": state.step, "data": self.batches.state(),
                         "rng": jax.random.key_data(state.rng).tolist(), "total_steps": self.total_steps})
        self.start_seconds.append(time.perf_counter() - t0)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MetricsWindow:
    """Step times, tokens and expert assignments since the last metrics row, which reports their rates and
    starts a new window. A step given no time (the first of a process, which includes compiling) counts its
    tokens but not in the throughput."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self._reset()

    def _reset(self) -> None:
        self.seconds: list[float] = []
        self.tokens, self.expert_tokens = 0, 0

    def add(self, metrics: dict, seconds: float | None) -> None:
        if seconds is not None:
            self.seconds.append(seconds)
        self.tokens += int(metrics["tokens"])
        self.expert_tokens = self.expert_tokens + np.asarray(metrics["expert_tokens"])

    def row(self, step: int, metrics: dict, learning_rate: float) -> dict:
        seconds = sum(self.seconds)
        tokens_per_s = self.tokens_per_step * len(self.seconds) / seconds if seconds else None
        row = {"step": step, "loss": float(metrics["loss"]), "lm_loss": float(metrics["lm_loss"]),
               "aux_loss": float(metrics["aux_loss"]), "lr": learning_rate,
               "grad_norm": float(metrics["grad_norm"]), "tokens": self.tokens, "tokens_per_s": tokens_per_s,
               "mfu": tokens_per_s * self.flops_per_token / self.peak_flops if tokens_per_s else None,
               "dropped_tokens": int(metrics["dropped_tokens"]), "expert_share": expert_share(self.expert_tokens)}
        self._reset()
        return row


@dataclasses.dataclass
class Trainer:
    """The loop's fixed parts, built once; `run` advances a TrainState with them."""

    config: TrainConfig
    step_fn: TrainStep
    frozen: Any
    data: RunData
    checkpoints: Checkpoints
    metrics_log: MetricsLog
    window: MetricsWindow
    learning_rate: optax.Schedule
    dropout: bool  # LoRA dropout is on: each step gets a key
    show_progress: bool

    def run(self, state: TrainState) -> dict:
        """Steps `state` to the end, or to a stop (SIGTERM, stop_at_step) after which it saves; returns what
        the run's summary gains: why it stopped, and the held-out scores before and after."""
        outcome = {"stopped": None}
        if self.data.eval_arrays is not None and state.step == 0:
            outcome["eval_before"] = self.write_evaluation(state)
        first_step, total = state.step, self.data.total_steps
        with tqdm(total=total, initial=state.step, desc="train", disable=not self.show_progress,
                  dynamic_ncols=True) as bar, _StopFlag() as stop:
            while state.step < total:
                metrics = self.advance(state, timed=state.step > first_step)
                bar.update(1)
                self.report(state, metrics, bar)
                if stop.raised or state.step == self.config.stop_at_step:
                    outcome["stopped"] = f"{'SIGTERM' if stop.raised else 'stop_at_step'} after step {state.step}"
                    self.save(state)
                    break
                if state.step % self.config.save_every == 0 or state.step == total:
                    self.save(state)
        if self.data.eval_arrays is not None and state.step == total:
            outcome["eval_after"] = self.write_evaluation(state)
        return outcome

    def advance(self, state: TrainState, timed: bool) -> dict:
        """One optimizer step on the next batch; a non-finite loss raises before the step is counted or saved."""
        batch = global_batch(next(self.data.batches), self.step_fn.batch_shardings, self.config.batch_size)
        dropout_key = jax.random.fold_in(state.rng, state.step) if self.dropout else None
        t0 = time.perf_counter()
        state.params, state.opt_state, metrics = self.step_fn.step(state.params, state.opt_state, batch,
                                                                   self.frozen, dropout_key)
        loss = float(metrics["loss"])  # waits for the step, so the time below is the step's
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise TrainingDiverged(f"step {state.step + 1}: the loss is {loss}; stopped without saving this step "
                                   f"(last checkpoint: step {self.checkpoints.latest_step()})")
        state.step += 1
        self.window.add(metrics, seconds if timed else None)
        return metrics

    def report(self, state: TrainState, metrics: dict, bar) -> None:
        """A metrics row every log_every steps and at the end; held-out scores every eval_every steps."""
        step, total = state.step, self.data.total_steps
        if step % self.config.log_every == 0 or step == total:
            row = self.window.row(step, metrics, float(self.learning_rate(step - 1)))
            self.metrics_log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s'] or 0:,.0f}")
        if self.data.eval_arrays is not None and self.config.eval_every and step % self.config.eval_every == 0 \
                and step < total:
            self.write_evaluation(state)

    def write_evaluation(self, state: TrainState) -> dict:
        scores = _evaluate(self.step_fn, state.params, self.frozen, self.data.eval_arrays, self.config.batch_size)
        self.metrics_log.write({"step": state.step, **scores})
        return scores

    def save(self, state: TrainState) -> None:
        self.checkpoints.save(state)
        self.metrics_log.flush()  # every row up to a checkpoint is stored with it (a remote log is uploaded late)


def _make_step(config: TrainConfig, run_model: runs.RunModel, model, mesh, total_steps: int) -> TrainStep:
    return make_train_step(model, make_optimizer(config.optimizer, total_steps), mesh,
                           (config.batch_size, config.data.seq_len), trainable=run_model.trainable(),
                           micro_batches=config.micro_batches, aux_loss_coef=config.aux_loss_coef,
                           master_dtype=master_dtype(config.optimizer))


def _warn_long_sequences(config: TrainConfig, model_config, log) -> None:
    """Training past the base's max_position_embeddings works (RoPE has no table) but leaves the length the
    model was trained on: a warning, not a refusal (long-context continued pre-training does it on purpose)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and config.data.seq_len > limit:
        log(f"warning: data.seq_len {config.data.seq_len} is beyond the max_position_embeddings {limit} of "
            f"{config.model.path}: RoPE positions past the length the model was trained on")


def train(config: TrainConfig, log=print) -> dict:
    """Runs (or resumes) the configured training; returns a summary of the run. Refused before anything is
    built or compiled: a batch the mesh's batch axes do not split evenly, a run directory that another
    trainer holds (RUN_DIR/train.lock), a resume with changes that break it (train/resume.py)."""
    initialize()
    mesh = make_mesh(config.mesh)
    data_lib.batch_split(mesh.shape, config.batch_size, config.micro_batches, what=f"mesh {config.mesh}: batch_size")
    resume.make_run_dir(config.run_dir)
    with run_lock.held(config.run_dir, log):
        return _train(config, mesh, log)


def _train(config: TrainConfig, mesh, log) -> dict:
    writer = jax.process_index() == 0
    run_model = run_model_of(config)
    resume.prepare_run_dir(config, run_model, checkpoint.saved_steps(config.run_dir), writer, log)

    tokenizer = load_tokenizer(config.model.tokenizer, model=runs.model_directory(config.model.path))
    model = pretrained.build_model(run_model, mesh)
    check_compatible(tokenizer, model.config.vocab_size, f"{config.model.path} field vocab_size")
    _warn_long_sequences(config, model.config, log)
    data = load_data(config, tokenizer, log)
    step_fn = _make_step(config, run_model, model, mesh, data.total_steps)
    flops_per_token = flop_counts(model.config, config.data.seq_len)["train_flops_per_token"]
    params, frozen = step_fn.split(model)
    state = TrainState(0, params, step_fn.init_opt_state(params), jax.random.key(config.seed))
    del model, params  # the state holds the weights now; a restore replaces them

    with contextlib.closing(Checkpoints(config, step_fn, data.batches, data.total_steps)) as checkpoints:
        if checkpoints.latest_step() is not None:
            state = checkpoints.restore(state, log)
            log(f"resuming {config.run_dir} from step {state.step}")
        summary = {"run_dir": config.run_dir, "start_step": state.step, "total_steps": data.total_steps,
                   "train_sequences": data.train_sequences, "sft_dropped": data.sft_dropped, "stopped": None}
        window = MetricsWindow(config.batch_size * config.data.seq_len, flops_per_token,
                               _peak_flops(config) * jax.device_count())
        with contextlib.closing(MetricsLog(config.run_dir, state.step, enabled=writer)) as metrics_log:
            trainer = Trainer(config, step_fn, frozen, data, checkpoints, metrics_log, window,
                              learning_rate=schedule(config.optimizer, data.total_steps),
                              dropout=bool(run_model.lora and config.lora.dropout),
                              show_progress=config.progress and writer)
            summary.update(trainer.run(state))
    summary.update(end_step=state.step, checkpoint_start_seconds=checkpoints.start_seconds)
    return summary
