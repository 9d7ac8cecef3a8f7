"""`mixtral-jax generate`: text from a prompt with any loadable model (the bundled tiny model by default)."""

from __future__ import annotations

import json
import time

from mixtral_jax.assets import TINY_MODEL_DIR
from mixtral_jax.cli.main import (
    DTYPE_HELP,
    MOE_BACKEND_HELP,
    HelpFormatter,
    dtype_option,
)
from mixtral_jax.config import MOE_BACKENDS


def register(commands) -> None:
    p = commands.add_parser("generate", help="generate text from a prompt", formatter_class=HelpFormatter,
                            description="Greedy or sampled continuation of each prompt (transformers' order: "
                                        "repetition penalty, temperature, top-k, top-p).")
    p.add_argument("model", nargs="?", default=TINY_MODEL_DIR,
                   help="HF model directory, Orbax model checkpoint or training run (default: the bundled tiny "
                        "model, random weights)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory or .model file (default: the model's own, else Mixtral's)")
    p.add_argument("--instruct", action="store_true", help="wrap each prompt in [INST] ... [/INST]")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated after each prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely tokens holding this probability mass; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present (multiply negative ones); 1 = off")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--dtype", type=dtype_option(), default=None, help=f"{DTYPE_HELP} (default: the checkpoint's)")
    p.add_argument("--moe-backend", default="dropless", choices=list(MOE_BACKENDS), help=MOE_BACKEND_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np

    from mixtral_jax.checkpoints.pretrained import from_pretrained
    from mixtral_jax.checkpoints.run_manifest import model_directory
    from mixtral_jax.data.tokenizer import (
        check_compatible,
        instruct_prompt,
        load_tokenizer,
    )
    from mixtral_jax.model.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    tokenizer = load_tokenizer(args.tokenizer, model=model_directory(args.model))
    model = from_pretrained(args.model, dtype=args.dtype, moe_backend=args.moe_backend)
    check_compatible(tokenizer, model.config.vocab_size, f"{args.model}/config.json")
    texts = [instruct_prompt(p) if args.instruct else p for p in args.prompt]
    encoded = [tokenizer.encode(t) for t in texts]
    width = max(len(ids) for ids in encoded)
    ids = np.zeros((len(encoded), width), np.int32)  # left-padded
    mask = np.zeros((len(encoded), width), bool)
    for row, seq in enumerate(encoded):
        ids[row, width - len(seq):], mask[row, width - len(seq):] = seq, True
    start = time.perf_counter()
    new_tokens = generate(model, ids, mask, sampling, eos_token_id=tokenizer.eos_id)
    seconds = time.perf_counter() - start
    outputs = []
    for row in new_tokens:
        row = list(row)
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        outputs.append(tokenizer.decode(row))
    if args.json:
        print(json.dumps({"prompts": args.prompt, "outputs": outputs, "seconds": round(seconds, 3)},
                         ensure_ascii=False))
    else:
        for prompt, output in zip(args.prompt, outputs):
            print(f"### {prompt}\n{output}\n")
    return 0
