#!/usr/bin/env bash
# Installs this project (the committed HEAD) with jax for TPU on every host of a slice, or with jax for CUDA
# on this machine (--local, a multi-GPU host).
#
#   tpu_scripts/setup.sh --name NAME --zone ZONE [--project PROJECT] [--python python3.11] [--dry-run]
#   tpu_scripts/setup.sh --local [--dry-run]
#
# On each host: Python 3.11 from Ubuntu's packages (the TPU images ship 3.10), a virtual environment in
# ~/mixtral-jax/.venv, and `pip install -e "~/mixtral-jax[gcs]" "jax[tpu]==0.10.2"`. Uncommitted changes are not
# copied: commit first. --dry-run prints the commands, one per line, and runs nothing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

PYTHON=python3.11
while (($#)); do
  case $1 in
    --python) PYTHON=${2:?--python needs a value} SHIFT=2 ;;
    *) common_option "$@" || die "unknown option $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done
cd "$(dirname "$0")/.."

if ((LOCAL)); then
  run python3 -m venv .venv
  run .venv/bin/pip install -q -e . "jax[cuda12]==$JAX_VERSION"
  exit 0
fi
need_slice
ARCHIVE=/tmp/mixtral-jax-src.tar.gz
run git archive --format=tar.gz "--output=$ARCHIVE" HEAD
copy_to_hosts "$ARCHIVE" mixtral-jax-src.tar.gz
on_all_hosts "$(join_quoted sudo apt-get update -q) && $(join_quoted sudo apt-get install -y -q "$PYTHON" \
  "$PYTHON-venv") && mkdir -p $REMOTE_DIR && tar -xzf mixtral-jax-src.tar.gz -C $REMOTE_DIR && \
$PYTHON -m venv $REMOTE_DIR/.venv && $REMOTE_DIR/.venv/bin/pip install -q -e \"${REMOTE_DIR}[gcs]\" \"jax[tpu]==$JAX_VERSION\""
