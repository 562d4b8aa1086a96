#!/usr/bin/env bash
# The shapes self-training demo end to end on this machine: teacher, caption export,
# pseudo-labels, student (configs/demo_selftrain.py explains each step).
#
#   launch/local/selftrain_demo.sh [--workdir runs/selftrain] [--tiny] [--dry-run]
#
# --tiny runs the tiny variants (seconds per step, for a check of the wiring); rerunning
# resumes every step that was interrupted.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/../common.sh"

workdir=runs/selftrain
prefix=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --tiny) prefix="tiny_"; shift ;;
    --dry-run) export DRY_RUN=1; shift ;;
    *) die "unknown argument $1 (see the header of this script)" ;;
  esac
done
config=configs/demo_selftrain.py
python=${PYTHON:-python}

run "$python" -m glipjax.train --config "$config:${prefix}teacher" --workdir "$workdir/teacher"
run "$python" -m glipjax.data.export_captions --config "$config:${prefix}teacher" --out "$workdir/captions"
run "$python" -m glipjax.pseudo_label --config "$config:${prefix}teacher" --teacher "$workdir/teacher" \
  --captions "$workdir/captions/captions.jsonl" --out "$workdir/pseudo"
run "$python" -m glipjax.train --config "$config:${prefix}student" --workdir "$workdir/student" \
  "--config.data.sources.pseudo.annotations=$workdir/pseudo/pseudo_labels.jsonl"
