"""lm-evaluation-harness adapter: our model and tokenizer as an `lm_eval` language model, so any lm-eval task
(`ceval-valid`, `cmmlu`, `mmlu`, ... or one defined in a local YAML) runs on any model `from_pretrained` loads.

`MixtralLM` subclasses lm-eval's `TemplateLM` (itself an `lm_eval.api.model.LM`), which splits each
(context, continuation) pair into tokens the way lm-eval's Hugging Face model does: the whole text and the
context are tokenised (BOS first), the continuation is the tail; trailing spaces of the context move to the
continuation; an empty context becomes BOS. Then:

* loglikelihood: sum of log p(continuation tokens) and whether each was the argmax. Sequences are sorted by
  length, left-padded to a multiple of `pad_multiple`, run `batch` at a time (mcq.py's buckets), and the
  head and log-softmax run only on the last `scored` positions (a power of two >= the batch's longest
  continuation), `position_chunk` positions at a time;
* loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens (BOS as the first context,
  no BOS inside the text), each scored as above, summed per document;
* generate_until: prompts left-truncated to leave room for `max_gen_toks`, bucketed the same way, decoded by
  mixtral_jax.model.generation (greedy unless the task asks for sampling) and cut at the first `until` string.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils
from lm_eval.api.model import TemplateLM

from eval.mcq import bucket_batches, left_padded
from mixtral_jax.model.generation import SamplingConfig, generate
from mixtral_jax.model.loss import blockwise_token_nll


@partial(jax.jit, static_argnames=("graphdef", "scored", "position_chunk"))
def _continuation_scores(graphdef, state, ids, mask, targets, valid, scored: int, position_chunk: int):
    """ids, mask [B, W] (left-padded inputs); targets, valid [B, scored]: what the last `scored` positions
    predict. Returns (sum of log p over valid targets [B] fp32, all valid targets greedy [B])."""
    model = nnx.merge(graphdef, state)
    hidden = model(ids, mask, return_hidden=True).hidden_states[:, -scored:]
    batch = hidden.shape[0]
    nll, greedy = blockwise_token_nll(hidden.reshape(batch * scored, -1), model.output_head(),
                                      targets.reshape(-1), batch * min(position_chunk, scored))
    nll, greedy = nll.reshape(batch, scored), greedy.reshape(batch, scored)
    return jnp.sum(jnp.where(valid, -nll, 0.0), -1), jnp.all(greedy | ~valid, -1)


def score_continuations(model, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], batch: int = 8,
                        pad_multiple: int = 64, pad_id: int = 0, position_chunk: int = 512,
                        progress: bool = False) -> list[tuple[float, bool]]:
    """(log p(targets[i] | inputs[i]), greedy) per pair: targets[i] are the tokens that the last
    len(targets[i]) positions of inputs[i] predict (inputs[i] ends with all but the last target)."""
    from tqdm import tqdm

    graphdef, state = nnx.split(model)
    out: list[tuple[float, bool]] = [(0.0, True)] * len(inputs)
    for width, members in tqdm(bucket_batches([len(s) for s in inputs], batch, pad_multiple), desc="loglikelihood",
                               unit="batch", disable=not progress):
        longest = max(len(targets[i]) for i in members)
        scored = min(width, 1 << (longest - 1).bit_length())
        ids, mask = left_padded(inputs, members, batch, width, pad_id)
        tgt = np.zeros((batch, scored), np.int32)
        ok = np.zeros((batch, scored), bool)
        for r, i in enumerate(members):
            n = len(targets[i])
            tgt[r, scored - n:], ok[r, scored - n:] = targets[i], True
        logp, greedy = _continuation_scores(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tgt),
                                            jnp.asarray(ok), scored, position_chunk)
        logp, greedy = np.asarray(logp), np.asarray(greedy)
        for r, i in enumerate(members):
            out[i] = (float(logp[r]), bool(greedy[r]))
    return out


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


class MixtralLM(TemplateLM):
    """Our Mixtral (anything `from_pretrained` loads) and tokenizer (mixtral_jax.data.tokenizer) as an lm-eval LM."""

    def __init__(self, model, tokenizer, batch: int = 8, pad_multiple: int = 64, max_length: int | None = None,
                 max_gen_toks: int = 256, position_chunk: int = 512, progress: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch, self.pad_multiple, self.position_chunk = batch, pad_multiple, position_chunk
        self.max_length = max_length or model.config.max_position_embeddings
        self.max_gen_toks, self.progress = max_gen_toks, progress

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", "mixtral")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_bos=add_special_tokens is not False)

    def _score(self, inputs, targets, disable_tqdm: bool) -> list[tuple[float, bool]]:
        return score_continuations(self.model, inputs, targets, self.batch, self.pad_multiple, self.tokenizer.eos_id,
                                   self.position_chunk, progress=self.progress and not disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        inputs, targets = [], []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # lm-eval's left truncation
            inputs.append(whole[:-1])
            targets.append(list(continuation))
        results = self._score(inputs, targets, disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        inputs, targets, owner = [], [], []
        for n, (string,) in enumerate(req.args for req in requests):
            windows = utils.get_rolling_token_windows(token_list=self.tok_encode(string, add_special_tokens=False),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, predicted in map(utils.make_disjoint_window, windows):
                inputs.append((context + predicted)[:-1])
                targets.append(predicted)
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(inputs, targets, disable_tqdm)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _sampling(self, kwargs: dict) -> tuple[SamplingConfig, tuple[str, ...]]:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        sample = kwargs.pop("do_sample", False) and kwargs.get("temperature", 1.0) > 0
        sampling = SamplingConfig(max_new_tokens=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                                  temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                  top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                  seed=int(kwargs.get("seed") or 0))
        return sampling, until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        groups: dict[SamplingConfig, list[int]] = {}
        parsed = [self._sampling(req.args[1]) for req in requests]
        for n, (sampling, _) in enumerate(parsed):
            groups.setdefault(sampling, []).append(n)
        pad_id = self.tokenizer.eos_id
        outputs: list[str] = [""] * len(requests)
        for sampling, members in groups.items():
            room = max(1, self.max_length - sampling.max_new_tokens)
            prompts = {n: self.tok_encode(requests[n].args[0])[-room:] for n in members}
            order = list(prompts)
            batches = bucket_batches([len(prompts[n]) for n in order], self.batch, self.pad_multiple)
            for width, rows in tqdm(batches, desc="generate_until", unit="batch",
                                    disable=disable_tqdm or not self.progress):
                seqs = [prompts[order[r]] for r in rows]
                ids, mask = left_padded(seqs, list(range(len(seqs))), self.batch, width, pad_id)
                tokens = generate(self.model, ids, mask, sampling, eos_token_id=self.tokenizer.eos_id)
                for r, row in zip(rows, tokens):
                    n = order[r]
                    new = list(row)
                    if self.tokenizer.eos_id in new:
                        new = new[: new.index(self.tokenizer.eos_id)]
                    outputs[n] = cut_at_stops(self.tokenizer.decode(new), parsed[n][1])
                    self.cache_hook.add_partial("generate_until", requests[n].args, outputs[n])
        return outputs


def run(args) -> int:
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval.report import write_json
    from mixtral_jax.checkpoints.pretrained import from_pretrained
    from mixtral_jax.checkpoints.run_manifest import model_directory
    from mixtral_jax.data.tokenizer import check_compatible, load_tokenizer

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks: no task names given")
    tokenizer = load_tokenizer(args.tokenizer, model=model_directory(args.model))
    model = from_pretrained(args.model, dtype=args.dtype, moe_backend=args.moe_backend,
                            attention_chunk=args.attention_chunk or None, show_progress=not args.quiet)
    check_compatible(tokenizer, model.config.vocab_size, f"{args.model}/config.json")
    lm = MixtralLM(model, tokenizer, batch=args.batch, pad_multiple=args.pad_multiple, max_length=args.max_length,
                   max_gen_toks=args.max_gen_toks, progress=not args.quiet)
    manager = TaskManager(include_path=args.include_path) if args.include_path else None
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=manager, log_samples=args.log_samples,
                                      bootstrap_iters=args.bootstrap_iters)
    if args.out:
        write_json(args.out, {"model": args.model, **json.loads(json.dumps(
            results, default=utils.handle_non_serializable, ensure_ascii=False))})
    print(utils.make_table(results))
    return 0
