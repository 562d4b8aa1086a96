#!/usr/bin/env bash
# glipjax training on a plain list of GPU hosts over ssh: one process per host (each
# drives all its GPUs), process i on the i-th host, the first host coordinating
# jax.distributed. Every host needs the project at the same path and a workdir that
# all of them see (shared filesystem or gs://). See --help.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$HERE/../common.sh"
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$HERE/env.sh"

usage() {
  cat <<'USAGE'
Usage: launch/gpu/ssh_hosts.sh --hosts FILE --config SPEC --workdir DIR [options] [-- TRAIN_OVERRIDES...]

  --hosts FILE        one [user@]host per line (blank lines and # comments skipped);
                      the first host runs process 0 and the coordinator
  --config SPEC       glipjax config file[:variant], e.g. configs/glip_t.py
  --workdir DIR       run directory all hosts see; rerunning the same command resumes
  --port PORT         coordinator port on the first host (default: 8476)
  --remote-dir DIR    the project's directory on the hosts (default: this checkout's path)
  --python PATH       python on the hosts (default: DIR/.venv/bin/python)
  --logdir DIR        where each host's output goes, as host-<i>.log (default: logs)
  --dry-run           print the commands instead of running them
  -h, --help          this help
Arguments after -- go to glipjax.train, e.g. -- --config.data.batch_size=64
Ctrl-C sends SIGTERM to every trainer: they save a checkpoint and exit.
XLA/NCCL settings: launch/gpu/env.sh (exported values win; they are passed to every host).
USAGE
}

DRY_RUN=${DRY_RUN:-0}
HOSTS_FILE="" CONFIG="" WORKDIR="" PORT=8476 REMOTE_DIR=$ROOT PYTHON="" LOGDIR=logs
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) need_value "$@"; HOSTS_FILE=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --logdir) need_value "$@"; LOGDIR=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[[ -n "$HOSTS_FILE" ]] || die "--hosts is required"
[[ -f "$HOSTS_FILE" ]] || die "hosts file not found: $HOSTS_FILE"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number, got $PORT"
PYTHON=${PYTHON:-$REMOTE_DIR/.venv/bin/python}

HOSTS=()
while read -r line || [[ -n "$line" ]]; do
  line=${line%%#*}
  read -r host _ <<< "$line" || true
  if [[ -n "${host:-}" ]]; then HOSTS+=("$host"); fi
done < "$HOSTS_FILE"
[[ ${#HOSTS[@]} -gt 0 ]] || die "no hosts in $HOSTS_FILE"
COORDINATOR=${HOSTS[0]#*@}:$PORT

ENV_ARGS=""
for var in "${GPU_ENV[@]}"; do
  if [[ -n "${!var:-}" ]]; then ENV_ARGS+=" $(printf '%q' "$var=${!var}")"; fi
done

# The command for process $1: its pid goes to a file so that Ctrl-C here can SIGTERM it.
remote_command() {
  local args
  printf -v args ' %q' --config "$CONFIG" --workdir "$WORKDIR" --coordinator "$COORDINATOR" \
    --num-processes "${#HOSTS[@]}" --process-id "$1" "${TRAIN_ARGS[@]}"
  printf 'cd %q && echo $$ > .glipjax-train-%d.pid && exec env%s %q -m glipjax.train%s' \
    "$REMOTE_DIR" "$1" "$ENV_ARGS" "$PYTHON" "$args"
}

if [[ "$DRY_RUN" == 1 ]]; then
  for i in "${!HOSTS[@]}"; do
    quote_cmd ssh -o BatchMode=yes "${HOSTS[$i]}" "$(remote_command "$i")"
  done
  exit 0
fi

mkdir -p "$LOGDIR"
PIDS=()
# shellcheck disable=SC2329  # called by the trap below
stop_all() {
  echo "stopping: SIGTERM to every trainer (each saves a checkpoint)" >&2
  for i in "${!HOSTS[@]}"; do
    ssh -o BatchMode=yes "${HOSTS[$i]}" "kill -TERM \$(cat $(printf '%q' "$REMOTE_DIR")/.glipjax-train-$i.pid)" || true
  done
}
trap stop_all INT TERM
for i in "${!HOSTS[@]}"; do
  ssh -o BatchMode=yes "${HOSTS[$i]}" "$(remote_command "$i")" > "$LOGDIR/host-$i.log" 2>&1 &
  PIDS+=($!)
  echo "process $i on ${HOSTS[$i]}: log $LOGDIR/host-$i.log"
done
status=0
for i in "${!PIDS[@]}"; do
  if ! wait "${PIDS[$i]}"; then
    echo "process $i on ${HOSTS[$i]} failed: see $LOGDIR/host-$i.log" >&2
    status=1
  fi
done
exit "$status"
