#!/usr/bin/env bash
# Deletes a TPU VM or slice (and, with --queued, its queued resource); the bucket and its checkpoints stay.
#
#   tpu_scripts/delete.sh --name NAME --zone ZONE [--queued] [--project PROJECT] [--dry-run]
#
#   --queued   the slice was created by create.sh --queued: delete the queued resource and its node
#   --dry-run  print the gcloud command and run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

QUEUED=0
while (($#)); do
  case $1 in
    --queued) QUEUED=1 SHIFT=1 ;;
    *) common_option "$@" || die "unknown option $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done
need_slice
where_flags
if ((QUEUED)); then
  run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
else
  tpu_vm delete --quiet
fi
