#!/usr/bin/env bash
# Puts data and a checkpoint store on every host of a slice: copies gs:// folders to local disk, and mounts
# a bucket with Cloud Storage FUSE so that all hosts share one run directory (checkpoints must be on storage
# every host sees: each host writes its own shards of each step).
#
#   tpu_scripts/data.sh --name NAME --zone ZONE [--copy gs://BUCKET/PATH=/LOCAL/DIR ...]
#                       [--mount BUCKET=/MOUNT/POINT] [--project PROJECT] [--dry-run]
#
#   --copy     `gcloud storage rsync --recursive` of a gs:// folder to a local directory on every host
#              (repeatable; a rerun copies only what changed). The trainer reads local paths only.
#   --mount    installs gcsfuse (Google's apt repository) and mounts BUCKET at /MOUNT/POINT on every host;
#              run_dir=/MOUNT/POINT/runs/NAME then keeps the checkpoints in the bucket, across preemptions.
#              Directory renames (Orbax commits a step by renaming its folder) need --rename-dir-limit on a
#              flat bucket; a bucket with hierarchical namespace makes them atomic.
#   --dry-run  print the commands, one per line, and run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

COPIES=() MOUNT=""
while (($#)); do
  case $1 in
    --copy) [[ ${2:-} == gs://*=/* ]] || die "--copy takes gs://BUCKET/PATH=/LOCAL/DIR, got '${2:-}'"
      COPIES+=("$2") SHIFT=2 ;;
    --mount) [[ ${2:-} =~ ^[a-z0-9][a-z0-9._-]*=/ ]] || die "--mount takes BUCKET=/MOUNT/POINT, got '${2:-}'"
      MOUNT=$2 SHIFT=2 ;;
    *) common_option "$@" || die "unknown option $1 (see --help)" ;;
  esac
  shift "$SHIFT"
done
need_slice
((${#COPIES[@]})) || [[ -n $MOUNT ]] || die "nothing to do: give --copy and/or --mount"

for copy in "${COPIES[@]}"; do
  source_url=${copy%%=/*} target=/${copy#*=/}
  on_all_hosts "$(join_quoted sudo mkdir -p "$target") && sudo chown \"\$USER\" $(quote "$target") && \
$(join_quoted gcloud storage rsync --recursive "$source_url" "$target")"
done
if [[ -n $MOUNT ]]; then
  bucket=${MOUNT%%=/*} point=/${MOUNT#*=/}
  on_all_hosts "command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] \
https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list \
&& curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc \
>/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && \
$(join_quoted sudo mkdir -p "$point") && sudo chown \"\$USER\" $(quote "$point") && \
{ mountpoint -q $(quote "$point") || $(join_quoted gcsfuse --implicit-dirs --rename-dir-limit=200000 "$bucket" "$point"); }"
fi
