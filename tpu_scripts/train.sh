#!/usr/bin/env bash
# Starts `mixtral-jax train CONFIG [key=value ...]` on every host of a slice at once (one process per host;
# on a TPU slice JAX finds the other hosts itself), detached, logging to ~/mixtral-jax-train.log on each
# host; or, with --local, in the foreground here as one process over all local GPUs.
#
#   tpu_scripts/train.sh --name NAME --zone ZONE [--project PROJECT] [--env KEY=VALUE ...] [--follow]
#                        [--dry-run] -- CONFIG [key=value ...]
#   tpu_scripts/train.sh --local [--dry-run] -- CONFIG [key=value ...]
#
# CONFIG is a preset (pretrain, sft, ...) or a YAML file; a YAML file here is copied to every host first.
# A run_dir that holds a checkpoint resumes from it, so after a preemption the same command continues the
# run (keep run_dir on storage every host sees and that outlives the slice: see data.sh --mount).
#   --env      an environment variable for the trainer on every host (repeatable), e.g. LIBTPU_INIT_ARGS=...
#   --follow   then stream worker 0's log (as logs.sh --follow)
#   --dry-run  print the commands, one per line, and run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

ENVS=() FOLLOW=0
while (($#)); do
  case $1 in
    --env) [[ ${2:-} =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes KEY=VALUE, got '${2:-}'"
      ENVS+=("$2") SHIFT=2 ;;
    --follow) FOLLOW=1 SHIFT=1 ;;
    --) shift; break ;;
    *) common_option "$@" || die "unknown option $1 (put the trainer's CONFIG and overrides after --)" ;;
  esac
  shift "$SHIFT"
done
(($#)) || die "give the trainer's arguments after --: CONFIG [key=value ...]"
CONFIG=$1
shift

PREFIX=()
((${#ENVS[@]} == 0)) || PREFIX=(env "${ENVS[@]}")
if ((LOCAL)); then
  cd "$(dirname "$0")/.."
  run "${PREFIX[@]}" .venv/bin/mixtral-jax train "$CONFIG" "$@"
  exit 0
fi
need_slice
if [[ -f $CONFIG ]]; then
  copy_to_hosts "$CONFIG" mixtral-jax-run.yaml
  CONFIG=mixtral-jax-run.yaml  # the trainer starts in the home directory
fi
trainer=$(join_quoted "${PREFIX[@]}" "$REMOTE_DIR/.venv/bin/mixtral-jax" train "$CONFIG" "$@")
on_all_hosts "setsid nohup $trainer >$REMOTE_LOG 2>&1 </dev/null &"
((FOLLOW)) || exit 0
common_args
"$(dirname "$0")/logs.sh" "${COMMON[@]}" --follow
