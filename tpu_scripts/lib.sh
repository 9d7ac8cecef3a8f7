# shellcheck shell=bash disable=SC2034
# Shared by the tpu_scripts: the common options, --dry-run and --help, and the gcloud command lines.
# Sourced, never run. Each script sets USAGE_LINES (its header comment) by calling `usage` from --help.

NAME="" ZONE="" PROJECT="" DRY_RUN=0 LOCAL=0 SHIFT=1
REMOTE_DIR=mixtral-jax               # the project on every host, under the home directory (where ssh starts)
REMOTE_LOG=mixtral-jax-train.log     # where train.sh writes and logs.sh reads, on every host
JAX_VERSION=0.10.2

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# The script's header comment (from line 2 to the first line that is not a comment) is its --help.
usage() {
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
}

# One word as a shell would need it: bare when safe, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The words as one command line, each quoted as needed.
join_quoted() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or under --dry-run prints it (one line, quoted so that it can be pasted) instead.
run() {
  if ((DRY_RUN)); then
    join_quoted "$@"
    echo
  else
    "$@"
  fi
}

# Handles one common option at "$1"; sets SHIFT to the words it took. Returns 1 for an option it does not know.
common_option() {
  case $1 in
    --name | --zone | --project)
      [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --name) NAME=$2 ;;
        --zone) ZONE=$2 ;;
        --project) PROJECT=$2 ;;
      esac
      SHIFT=2 ;;
    --dry-run) DRY_RUN=1 SHIFT=1 ;;
    --local) LOCAL=1 SHIFT=1 ;;
    -h | --help) usage ;;
    *) return 1 ;;
  esac
}

# The common options as given, to pass on to another of these scripts.
common_args() {
  COMMON=(--name "$NAME" --zone "$ZONE")
  [[ -z $PROJECT ]] || COMMON+=(--project "$PROJECT")
  ((!DRY_RUN)) || COMMON+=(--dry-run)
}

need_slice() {
  [[ -n $NAME ]] || die "--name NAME is required (the TPU VM or slice)"
  [[ -n $ZONE ]] || die "--zone ZONE is required (e.g. us-east5-a)"
}

# --zone and, when given, --project: every gcloud tpus command takes them.
where_flags() {
  WHERE=("--zone=$ZONE")
  [[ -z $PROJECT ]] || WHERE+=("--project=$PROJECT")
}

# gcloud compute tpus tpu-vm VERB NAME --zone=... [ARGS...]
tpu_vm() {
  local verb=$1
  shift
  where_flags
  run gcloud compute tpus tpu-vm "$verb" "$NAME" "${WHERE[@]}" "$@"
}

# Runs one shell command line on every host of the slice at once.
on_all_hosts() {
  tpu_vm ssh --worker=all --command "$1"
}

# Copies a local file to the same path under the home directory of every host.
copy_to_hosts() {
  where_flags
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${WHERE[@]}" --worker=all
}

# The TPU software version for an accelerator type (cloud.google.com/tpu/docs/runtimes).
runtime_version() {
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "unknown accelerator type '$1' (v4-N, v5litepod-N, v5p-N or v6e-N; or pass --version)" ;;
  esac
}
