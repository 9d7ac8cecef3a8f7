#!/usr/bin/env bash
# Shows the training log of a slice's hosts (~/mixtral-jax-train.log, written by train.sh).
#
#   tpu_scripts/logs.sh --name NAME --zone ZONE [--worker N|all] [--lines N] [--follow] [--project PROJECT]
#                       [--dry-run]
#
#   --worker   which host: 0 (default; process 0 prints the progress and writes the metrics) or all
#   --lines    how many last lines (default 100)
#   --follow   keep streaming new lines (Ctrl-C stops watching; the run goes on)
#   --dry-run  print the gcloud command and run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

WORKER=0 LINES=100 FOLLOW=""
while (($#)); do
  case $1 in
    --worker) [[ ${2:-} =~ ^([0-9]+|all)$ ]] || die "--worker takes a number or all, got '${2:-}'"
      WORKER=$2 SHIFT=2 ;;
    --lines) [[ ${2:-} =~ ^[0-9]+$ ]] || die "--lines takes a number, got '${2:-}'"
      LINES=$2 SHIFT=2 ;;
    --follow) FOLLOW=" -F" SHIFT=1 ;;
    *) common_option "$@" || die "unknown option $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done
need_slice
tpu_vm ssh "--worker=$WORKER" --command "tail -n $LINES$FOLLOW $REMOTE_LOG"
