#!/usr/bin/env bash
# Creates a TPU VM or a multi-host slice (v4, v5e, v5p, v6e), directly or as a queued resource.
#
#   tpu_scripts/create.sh --name NAME --zone ZONE --type TYPE [--version VERSION] [--spot | --preemptible]
#                         [--queued] [--project PROJECT] [--dry-run]
#
#   --type       accelerator type: v4-32, v5litepod-16, v5p-128, v6e-64, ... (one host is v4-8, v5p-8, ...)
#   --version    TPU software version; default from the type: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite
#                (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   --spot       Spot VMs: cheaper, preemptible at any time (train.sh resumes from the last checkpoint)
#   --preemptible  the older preemptible TPUs (at most 24 hours); not with --queued
#   --queued     request the slice as a queued resource (waits in line for capacity; named NAME, node NAME)
#                and wait until it is ACTIVE
#   --dry-run    print the gcloud commands, one per line, and run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

TYPE="" VERSION="" CAPACITY="" QUEUED=0
while (($#)); do
  case $1 in
    --type) TYPE=${2:?--type needs a value} SHIFT=2 ;;
    --version) VERSION=${2:?--version needs a value} SHIFT=2 ;;
    --spot | --preemptible) [[ -z $CAPACITY ]] || die "--spot and --preemptible exclude each other"
      CAPACITY=$1 SHIFT=1 ;;
    --queued) QUEUED=1 SHIFT=1 ;;
    *) common_option "$@" || die "unknown option $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done
need_slice
[[ -n $TYPE ]] || die "--type TYPE is required (e.g. v5p-128)"
VERSION=${VERSION:-$(runtime_version "$TYPE")}
where_flags

if ((!QUEUED)); then
  run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE" "--version=$VERSION" \
    ${CAPACITY:+"$CAPACITY"}
  exit 0
fi
[[ $CAPACITY != --preemptible ]] || die "queued resources take --spot, not --preemptible"
run gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE" \
  "--runtime-version=$VERSION" "--node-id=$NAME" ${CAPACITY:+"$CAPACITY"}
while :; do
  state=$(run gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" "--format=value(state.state)")
  ((DRY_RUN)) && { echo "$state"; break; }
  case $state in
    ACTIVE) echo "$NAME is ACTIVE" >&2; break ;;
    FAILED | SUSPENDED) die "queued resource $NAME is $state (see: gcloud compute tpus queued-resources describe)" ;;
    *) echo "$NAME: $state; waiting" >&2; sleep 60 ;;
  esac
done
