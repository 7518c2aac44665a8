#!/bin/bash
# Container entrypoint: runner commands and flags go to `python -m runner`; a program on PATH runs
# as given (`docker run IMAGE sh` for debugging). No command list here: a word that names no
# program is the runner's (its own error names a mistyped command; a test checks no runner
# command is shadowed by a program in the image). Prints nothing itself, so it never echoes a secret.
set -Eeuo pipefail

is_program() {
  case "${1-}" in
    -*) return 1 ;;
    */*) [ -x "$1" ] ;;
    *) type -P -- "$1" >/dev/null ;;
  esac
}

main() {
  # no arguments at all (CMD overridden with nothing): let the runner print its usage error
  if [ "$#" -gt 0 ] && is_program "$1"; then
    exec "$@"
  fi
  exec python -m runner "$@"
}

main "$@"
