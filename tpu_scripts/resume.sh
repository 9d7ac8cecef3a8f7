#!/usr/bin/env bash
# Brings a run back after a preemption: a slice that is no longer READY (Spot and preemptible slices cannot
# be restarted) is deleted and created again, set up, given its data, and the same training command is
# started; the trainer continues from the last checkpoint in its run_dir (on the mounted bucket). A READY
# slice only gets the training command again (after a crash of the run itself).
#
#   tpu_scripts/resume.sh --name NAME --zone ZONE --type TYPE [create.sh options] [--copy ...] [--mount ...]
#                         [--env ...] [--project PROJECT] [--dry-run] -- CONFIG [key=value ...]
#
# Run it by hand, or from cron every few minutes: on a healthy slice whose run is alive it is a no-op
# (it finds the trainer still running and exits). --dry-run prints every command of the recreating path
# (as if the slice had been preempted), one per line, and runs nothing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

CREATE=() DATA=() TRAIN=() QUEUED=()
while (($#)); do
  case $1 in
    --type | --version) CREATE+=("$1" "${2:?$1 needs a value}") SHIFT=2 ;;
    --spot | --preemptible) CREATE+=("$1") SHIFT=1 ;;
    --queued) QUEUED=(--queued) SHIFT=1 ;;
    --copy | --mount) DATA+=("$1" "${2:?$1 needs a value}") SHIFT=2 ;;
    --env) TRAIN+=("$1" "${2:?$1 needs a value}") SHIFT=2 ;;
    --) shift; break ;;
    *) common_option "$@" || die "unknown option $1 (put the trainer's CONFIG and overrides after --)" ;;
  esac
  shift "$SHIFT"
done
(($#)) || die "give the trainer's arguments after --: CONFIG [key=value ...]"
need_slice
common_args
here=$(dirname "$0")

state=$(tpu_vm describe "--format=value(state)" 2>/dev/null || echo GONE)
if ((DRY_RUN)); then
  echo "$state"
  state=PREEMPTED
fi
if [[ $state == READY ]]; then
  alive=$(tpu_vm ssh --worker=0 --command "pgrep -f '[m]ixtral-jax train' >/dev/null && echo alive || true")
  [[ $alive != alive ]] || { echo "$NAME is READY and its run is alive: nothing to do" >&2; exit 0; }
else
  echo "$NAME is $state: recreating it" >&2
  [[ $state == GONE && ${#QUEUED[@]} -eq 0 ]] || "$here/delete.sh" "${COMMON[@]}" "${QUEUED[@]}"
  "$here/create.sh" "${COMMON[@]}" "${CREATE[@]}" "${QUEUED[@]}"
  "$here/setup.sh" "${COMMON[@]}"
  ((${#DATA[@]} == 0)) || "$here/data.sh" "${COMMON[@]}" "${DATA[@]}"
fi
"$here/train.sh" "${COMMON[@]}" "${TRAIN[@]}" -- "$@"
