"""`mixtral-jax bench ...`: benchmarks of our programs (the comparisons against PyTorch live in bench/*.py)."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    p = commands.add_parser("bench", help="benchmark our programs on random data")
    sub = p.add_subparsers(dest="bench_command", required=True)
    train = sub.add_parser(
        "train", help="time our jitted train step (full, LoRA or QLoRA) on random tokens",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Runs our train step alone on random tokens, fp32, one device, and prints progress on stderr "
                    "and, as the last line on stdout, one JSON object: tokens_per_s (median over the steps after "
                    "the first, compiling one), step_ms, compile_s, peak_rss_mb (this process's high-water mark, "
                    "taken before --breakdown), mfu against the fp32 matmul peak measured in this process. "
                    "Compare with PyTorch: python -m bench.bench_train --compare.")
    train.add_argument("--config", default="bench-tiny", help="config preset (bench-tiny, bench-moe, ...)")
    train.add_argument("--mode", default="full", choices=["full", "lora", "qlora"],
                       help="full: every parameter trained (AdamW); lora: LoRA r 64 alpha 128 on all 8 targets, "
                            "only the adapters trained; qlora: the same over an NF4 base")
    train.add_argument("--steps", type=int, default=8, help="timed steps after the first (compiling) one")
    train.add_argument("--batch", type=int, default=4, help="sequences per step")
    train.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    train.add_argument("--moe-backend", default="dropless", choices=["dense", "dropless", "capacity"])
    train.add_argument("--breakdown", action="store_true",
                       help="afterwards also time the forward alone, forward+backward alone and the optimizer alone")
    train.add_argument("--peak-tflops", type=float, default=None,
                       help="per-device peak for MFU (default: a known accelerator's bf16 data-sheet peak, else "
                            "the fp32 matmul peak measured in this process)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. remat_policy=dots)")
    train.set_defaults(run=run_train)


def run_train(args) -> int:
    from bench.bench_train import run_ours

    run_ours(args)
    return 0
