#!/usr/bin/env bash
# Cloud TPU VM slices for glipjax: create one, install the project on every worker,
# train on all workers at once, recreate it after a preemption (the run resumes from
# the checkpoints in its gs:// workdir), delete it. Run `launch/tpu/tpu.sh --help`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$HERE/../common.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu/tpu.sh COMMAND --name NAME --zone ZONE [options] [-- TRAIN_OVERRIDES...]

Commands:
  create   create the slice (--type, --version, --spot)
  setup    install the project on every worker: this checkout's HEAD (git archive) or --repo
  train    start python -m glipjax.train on all workers at once, in the background
           (log: ~/glipjax-train.log on each worker)
  watch    check the slice every --interval seconds; when it is PREEMPTED, TERMINATED,
           STOPPED or gone: delete, create, setup and train again, which resumes from
           the workdir's last checkpoint. Stop it with Ctrl-C.
  up       create, setup, train, then watch
  delete   delete the slice

Options:
  --name NAME          slice name
  --zone ZONE          zone with capacity for the type, e.g. us-central2-b
  --project PROJECT    gcloud project (default: gcloud's configured project)
  --type TYPE          accelerator type, e.g. v4-16, v5litepod-8, v5p-8, v6e-8
  --version VERSION    TPU software version (default by generation: v4 tpu-ubuntu2204-base,
                       v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot               spot capacity: cheaper, preemptible at any time (watch recreates it)
  --config SPEC        glipjax config file[:variant], e.g. configs/glip_t.py
  --workdir gs://...   the run's directory on GCS, the same across restarts
  --repo URL           git URL to install instead of this checkout's HEAD
  --ref REF            branch, tag or commit of --repo (default: main)
  --interval SECONDS   watch interval (default: 120)
  --dry-run            print the commands instead of running them
  -h, --help           this help
Arguments after -- go to glipjax.train, e.g. -- --config.data.batch_size=64
USAGE
}

COMMAND=${1:-}
case "$COMMAND" in
  -h|--help) usage; exit 0 ;;
  create|setup|train|watch|up|delete) shift ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command: $COMMAND (create, setup, train, watch, up or delete)" ;;
esac
ARGS=("$@")  # passed on when watch runs the other commands

DRY_RUN=${DRY_RUN:-0}
NAME="" ZONE="" PROJECT="" TYPE="" VERSION="" SPOT=0 CONFIG="" WORKDIR="" REPO="" REF=main INTERVAL=120
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --interval) need_value "$@"; INTERVAL=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$INTERVAL" =~ ^[0-9]+$ ]] || die "--interval must be a number of seconds, got $INTERVAL"
LOCATION=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then LOCATION+=(--project="$PROJECT"); fi
REMOTE_DIR=glipjax  # under each worker's home
REMOTE_VENV=glipjax-venv
REMOTE_LOG=glipjax-train.log
COORDINATOR_PORT=8476

default_version() {
  case "$1" in
    v4-[0-9]*) echo tpu-ubuntu2204-base ;;
    v5litepod-[0-9]*) echo v2-alpha-tpuv5-lite ;;
    v5p-[0-9]*) echo v2-alpha-tpuv5 ;;
    v6e-[0-9]*) echo v2-alpha-tpuv6e ;;
    *) die "unknown TPU type '$1': expected v4-N, v5litepod-N, v5p-N or v6e-N (or give --version)" ;;
  esac
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker=all --command="$1"
}

cmd_create() {
  [[ -n "$TYPE" ]] || die "--type is required to create a slice"
  if [[ -z "$VERSION" ]]; then VERSION=$(default_version "$TYPE"); fi
  local args=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}" --accelerator-type="$TYPE" --version="$VERSION")
  if [[ "$SPOT" == 1 ]]; then args+=(--spot); fi
  run "${args[@]}"
}

cmd_setup() {
  local fetch
  if [[ -n "$REPO" ]]; then
    fetch="rm -rf ~/$REMOTE_DIR && git clone -q $(printf '%q' "$REPO") ~/$REMOTE_DIR && git -C ~/$REMOTE_DIR checkout -q $(printf '%q' "$REF")"
  else
    local tarball="${TMPDIR:-/tmp}/glipjax-$NAME.tar.gz"
    run git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:glipjax.tar.gz" "${LOCATION[@]}" --worker=all
    fetch="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/glipjax.tar.gz -C ~/$REMOTE_DIR"
  fi
  ssh_all "set -e; $fetch && python3 -m venv ~/$REMOTE_VENV && ~/$REMOTE_VENV/bin/pip install -q -U pip && cd ~/$REMOTE_DIR && ~/$REMOTE_VENV/bin/pip install -q -e \".[data,tpu]\""
}

cmd_train() {
  [[ -n "$CONFIG" ]] || die "--config is required to train"
  [[ "$WORKDIR" == gs://?* ]] || die "--workdir must be a gs:// path (got '$WORKDIR'): all workers, and the slice recreated after a preemption, must see the same checkpoints"
  # Worker 0 coordinates jax.distributed; JAX finds the process count and ids itself on Cloud TPU.
  local worker0
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_cmd gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(networkEndpoints[0].ipAddress)'
    worker0=WORKER0_IP
  else
    worker0=$(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(networkEndpoints[0].ipAddress)')
  fi
  local args
  printf -v args ' %q' --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}"
  ssh_all "cd ~/$REMOTE_DIR && JAX_COORDINATOR_ADDRESS=$worker0:$COORDINATOR_PORT TF_CPP_MIN_LOG_LEVEL=2 nohup ~/$REMOTE_VENV/bin/python -m glipjax.train$args > ~/$REMOTE_LOG 2>&1 < /dev/null &"
}

cmd_delete() {
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
}

# The other commands run as child processes, so a failed step (no capacity yet) ends
# that step only and watch tries again at the next check.
self() {
  local flags=()
  if [[ "$DRY_RUN" == 1 ]]; then flags=(--dry-run); fi
  "$HERE/tpu.sh" "$1" "${ARGS[@]}" "${flags[@]}"
}

cmd_watch() {
  [[ -n "$TYPE" && -n "$CONFIG" && -n "$WORKDIR" ]] || die "watch needs --type, --config and --workdir to recreate the slice"
  local state
  while true; do
    if [[ "$DRY_RUN" == 1 ]]; then
      quote_cmd gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)'
      state=${DRY_RUN_STATE:-PREEMPTED}
    else
      state=$(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}" --format='value(state)' 2>/dev/null) || state=NOT_FOUND
    fi
    case "$state" in
      PREEMPTED|TERMINATED|STOPPED|NOT_FOUND)
        echo "$(date -u +%FT%TZ) slice $NAME is $state: recreating it and resuming from $WORKDIR" >&2
        if [[ "$state" == NOT_FOUND ]] || self delete; then
          self create && self setup && self train || echo "recovery failed; retrying in $INTERVAL s" >&2
        fi ;;
      *) ;;  # READY, or on its way (CREATING, STARTING, RESTARTING, REPAIRING)
    esac
    if [[ "$DRY_RUN" == 1 ]]; then break; fi
    sleep "$INTERVAL"
  done
}

case "$COMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  watch) cmd_watch ;;
  up) cmd_create; cmd_setup; cmd_train; cmd_watch ;;
  delete) cmd_delete ;;
esac
