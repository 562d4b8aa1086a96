# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).

# Prints a command as one line that a shell reads back as the same words: plain words
# as they are, others in single quotes.
quote_cmd() {
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$word"); else out+=("${word@Q}"); fi
  done
  printf '%s\n' "${out[*]}"
}

# Runs a command, or only prints it (quoted) when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quote_cmd "$@"
  else
    "$@"
  fi
}

die() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# need_value "$@" (at a flag that takes a value): the next word must be that value.
need_value() {
  [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value"
}
