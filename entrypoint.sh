#!/bin/bash
# Container entrypoint: runner commands and flags go to `python -m runner`; anything else runs as
# given (`docker run IMAGE sh` for debugging). Prints nothing itself, so it never echoes a secret.
set -Eeuo pipefail

is_runner_command() {
  case "${1-}" in
    upgrade | downgrade | status | wait | plan | verify | backup | backups | restore | history | stamp | repair | -*) return 0 ;;
    *) return 1 ;;
  esac
}

main() {
  # no arguments at all (CMD overridden with nothing): let the runner print its usage error
  if [ "$#" -eq 0 ] || is_runner_command "$1"; then
    exec python -m runner "$@"
  fi
  exec "$@"
}

main "$@"
