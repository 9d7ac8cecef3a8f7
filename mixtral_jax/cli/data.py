"""`mixtral-jax data prepare`: tokenise training data once into a prepared store that `train` memory-maps."""

from __future__ import annotations

import json
import time

from mixtral_jax.cli.main import HelpFormatter
from mixtral_jax.data import store


def register(commands) -> None:
    data = commands.add_parser("data", help="prepare training data once for every run and host",
                               formatter_class=HelpFormatter)
    actions = data.add_subparsers(dest="action", required=True)
    p = actions.add_parser("prepare", formatter_class=HelpFormatter,
                           help="tokenise sources in parallel into a prepared store",
                           description="Tokenises SOURCEs (files, directories, globs, hf:, tfds:, bundled:, gs://) "
                                       "once, over all cores, into a store that `mixtral-jax train "
                                       "data.train=[DIR]` reads without loading it. The store holds exactly the "
                                       "sequences train builds from the same raw sources.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="text or Alpaca-JSON sources, read in this order")
    p.add_argument("--out", required=True, help="the store's directory, local or gs:// (written whole or not at all)")
    p.add_argument("--kind", default="pretrain", choices=store.KINDS,
                   help="pretrain: fixed blocks of --seq-len tokens; sft: instruction examples up to --seq-len")
    p.add_argument("--seq-len", type=int, default=1024, help="the run's data.seq_len")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model file or HF tokenizer directory (default: --model's, else Mixtral's)")
    p.add_argument("--model", default=None,
                   help="use the tokenizer that came with this model directory, as train does for model.path "
                        "(a vocabulary-extended model brings its own)")
    p.add_argument("--group-lines", type=int, default=1000, help="pretrain: lines concatenated before cutting blocks")
    p.add_argument("--text-field", default="text", help="the text field of JSON lines and datasets")
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: every core)")
    p.add_argument("--shard-rows", type=int, default=store.DEFAULT_SHARD_ROWS, help="sequences per shard file")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    p.set_defaults(run=run_prepare)


def run_prepare(args) -> int:
    from mixtral_jax.data.prepare import prepare

    started = time.perf_counter()
    from mixtral_jax.data.tokenizer import model_tokenizer_path

    tokenizer = args.tokenizer or model_tokenizer_path(args.model)
    manifest = prepare(args.sources, args.out, args.kind, args.seq_len, tokenizer, args.group_lines,
                       args.workers, args.text_field, args.shard_rows)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps(manifest, ensure_ascii=False, indent=1))
        return 0
    counts = manifest["counts"]
    print(f"{args.out}: {counts['sequences']:,} {manifest['kind']} sequences, {counts['tokens']:,} tokens "
          f"from {counts['text_bytes'] / 1e6:,.1f} MB of text in {seconds:,.1f} s "
          f"({counts['text_bytes'] / 1e6 / seconds:,.1f} MB/s, {counts['tokens'] / seconds:,.0f} tokens/s)"
          + (f"; {counts['dropped']:,} SFT samples dropped (the prompt alone fills --seq-len)"
             if counts["dropped"] else ""))
    return 0
