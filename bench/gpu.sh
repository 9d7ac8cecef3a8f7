#!/usr/bin/env bash
# The train step on one GPU (H100/H200): a ~1.15B-parameter Mixtral shape (preset bench-1b), bf16, dropless,
# for full fine-tuning, LoRA (r 64 on all 8 targets) and QLoRA (the same over an NF4 base), with the GPU
# kernels (experts: Pallas Mosaic GPU grouped products, `grouped_matmul=mosaic_gpu`; attention: cuDNN's fused
# attention), then full fine-tuning once more with XLA's ragged_dot and attention, the baseline on the same card.
# First checks those kernels against their fp32 references (bench/bench_gpu_kernels.py). Prints one JSON line
# per run (tokens_per_s, mfu against the GPU's bf16 data-sheet peak, peak memory) and a summary table; about
# 4-5 minutes. A run that fails is reported and the others go on.
# Then, at Mixtral-8x7B's real widths (preset mixtral-8x7b-slice with SLICE_LAYERS layers, default 3: what
# `mixtral-jax plan` says full fine-tuning with fp32 masters and moments fits in one H200), the three modes again
# on the same slice with SLICE_BATCH x SLICE_SEQ tokens, and tokamax's kernels against ours
# (bench_gpu_kernels --tokamax; needs `pip install -e ".[gpu]"`).
# SLICE=0 skips that part (about 4 more minutes).
#
#   bash bench/gpu.sh [STEPS] [BATCH] [SEQ]        (defaults 10, 8, 2048; GMM= and ATTENTION= override the
#                                                  kernels: GMM=ragged_dot ATTENTION=xla is the baseline;
#                                                  REMAT= the remat policy, default dots_no_batch)
#
# Needs jax with CUDA in the Python that runs it (PYTHON, default .venv/bin/python):
#   pip install -e . "jax[cuda12]==0.10.2"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
STEPS="${1:-10}" BATCH="${2:-8}" SEQ="${3:-2048}"
GMM="${GMM:-mosaic_gpu}" ATTENTION="${ATTENTION:-cudnn}" REMAT="${REMAT:-dots_no_batch}"
SLICE="${SLICE:-1}" SLICE_BATCH="${SLICE_BATCH:-2}" SLICE_SEQ="${SLICE_SEQ:-4096}"
SLICE_LAYERS="${SLICE_LAYERS:-3}"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3

if ! "$PYTHON" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: $PYTHON's jax sees no GPU (install jax[cuda12]==0.10.2 into it)" >&2
  exit 2
fi
"$PYTHON" -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind}, jax {jax.__version__}")'
OUT="${OUT:-$(mktemp -d)}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
"$PYTHON" -m bench.bench_gpu_kernels --batch "$BATCH" --seq "$SEQ" --json "$OUT/kernels.json" ||
  echo "bench/gpu.sh: the kernel check failed (above)" >&2

step() {  # step NAME MODE GROUPED_MATMUL ATTENTION [PRESET BATCH SEQ KEY=VALUE...]
  local name=$1 mode=$2 gmm=$3 attention=$4 preset=${5:-bench-1b} batch=${6:-$BATCH} seq=${7:-$SEQ}
  shift $(($# < 7 ? $# : 7))
  "$PYTHON" -m mixtral_jax.cli bench train --config "$preset" --mode "$mode" --steps "$STEPS" --batch "$batch" \
    --seq "$seq" --moe-backend dropless dtype=bfloat16 param_dtype=bfloat16 grouped_matmul="$gmm" \
    attention_implementation="$attention" remat_policy="$REMAT" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  if ((status == 0)); then tail -n 1 "$OUT/$name.log" | tee "$OUT/$name.json"
  else echo "bench/gpu.sh: $name failed (exit $status):" >&2; tail -n 20 "$OUT/$name.log" >&2; fi
}
for mode in full lora qlora; do step "$mode" "$mode" "$GMM" "$ATTENTION"; done
step full-baseline full ragged_dot xla
RUNS=(full lora qlora full-baseline)
if [[ $SLICE == 1 ]]; then
  for mode in full lora qlora; do
    step "slice-$mode" "$mode" "$GMM" "$ATTENTION" mixtral-8x7b-slice "$SLICE_BATCH" "$SLICE_SEQ" \
      num_hidden_layers="$SLICE_LAYERS"
    RUNS+=("slice-$mode")
  done
  "$PYTHON" -m bench.bench_gpu_kernels --tokamax --batch "$BATCH" --seq "$SEQ" --json "$OUT/tokamax.json" ||
    echo "bench/gpu.sh: the tokamax comparison failed (above)" >&2
fi

"$PYTHON" - "$OUT" "${RUNS[@]}" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| run | tokens/s | MFU | step ms | compile s | peak RSS MB |\n|---|---:|---:|---:|---:|---:|")
for run in sys.argv[2:]:
    path = out / f"{run}.json"
    if not path.exists():
        print(f"| {run} | failed | | | | |")
        continue
    r = json.loads(path.read_text())
    print(f"| {run} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r.get('step_ms', 0):.0f} "
          f"| {r.get('compile_s', 0):.1f} | {r['peak_rss_mb']:,.0f} |")
PY
