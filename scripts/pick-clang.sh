#!/usr/bin/env bash
# Prints the clang major version for the fuzz build: the release's default
# (the version Debian's `clang` package depends on: 14 on Debian 12, 19 on
# Debian 13), else the newest N for which both clang-N and
# libclang-rt-N-dev (libFuzzer, the sanitizer runtimes) are installed or
# offered by apt. TORCHSER_CLANG=N chooses one.
set -euo pipefail
if [ -n "${TORCHSER_CLANG:-}" ]; then
  echo "$TORCHSER_CLANG"
  exit 0
fi
offered() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" && return 0
  local candidate
  candidate=$(apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p')
  [ -n "$candidate" ] && [ "$candidate" != "(none)" ]
}
# apt's lists may be empty on a fresh machine.
if ! apt-cache policy clang 2>/dev/null | grep -q "Candidate: [0-9]"; then
  sudo=(); [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  "${sudo[@]}" apt-get update -qq >&2 || true
fi
default=$(apt-cache depends clang 2>/dev/null | sed -n 's/^ *Depends: clang-\([0-9]*\)$/\1/p' | head -1)
for n in $default 21 20 19 18 17 16 15 14; do
  if offered "clang-$n" && offered "libclang-rt-$n-dev"; then
    echo "$n"
    exit 0
  fi
done
echo "pick-clang: no clang-N with libclang-rt-N-dev (14 to 21) is installed or offered by apt" >&2
exit 1
