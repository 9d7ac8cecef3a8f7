#!/usr/bin/env bash
# The train step on one GPU (H100 class): a ~1.15B-parameter Mixtral shape (preset bench-1b), bf16, dropless
# with ragged_dot, for full fine-tuning, LoRA (r 64 on all 8 targets) and QLoRA (the same over an NF4 base).
# Prints one JSON line per mode (tokens_per_s, mfu against the GPU's bf16 data-sheet peak, peak memory) and a
# summary table; about 3-4 minutes.
#
#   bash bench/gpu.sh [STEPS] [BATCH] [SEQ]        (defaults 10, 8, 2048)
#
# Needs jax with CUDA in the Python that runs it (PYTHON, default .venv/bin/python):
#   pip install -e . "jax[cuda12]==0.10.2"
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-10}" BATCH="${2:-8}" SEQ="${3:-2048}"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3

if ! "$PYTHON" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: $PYTHON's jax sees no GPU (install jax[cuda12]==0.10.2 into it)" >&2
  exit 2
fi
"$PYTHON" -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind}, jax {jax.__version__}")'
OUT="${OUT:-$(mktemp -d)}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
for mode in full lora qlora; do
  "$PYTHON" -m mixtral_jax.cli bench train --config bench-1b --mode "$mode" --steps "$STEPS" --batch "$BATCH" \
    --seq "$SEQ" --moe-backend dropless dtype=bfloat16 param_dtype=bfloat16 grouped_matmul=ragged_dot \
    remat_policy=dots_no_batch | tail -n 1 | tee "$OUT/$mode.json"
done
"$PYTHON" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| mode | tokens/s | MFU | step ms | peak RSS MB |\n|---|---:|---:|---:|---:|")
for mode in ("full", "lora", "qlora"):
    r = json.loads((out / f"{mode}.json").read_text())
    print(f"| {mode} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r.get('step_ms', 0):.0f} | {r['peak_rss_mb']:,.0f} |")
PY
