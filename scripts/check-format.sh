#!/usr/bin/env bash
# Checks that every C++ source and header is formatted as .clang-format says
# (scripts/check-format.sh --fix formats them). The style is pinned to
# clang-format 14, Debian 12's: other releases format some constructs
# differently, so where apt offers no clang-format-14 (Debian 13) the check
# says so and passes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang-format-14 >/dev/null 2>&1; then
  candidate=$(apt-cache policy clang-format-14 2>/dev/null | sed -n 's/^ *Candidate: //p')
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    echo "check-format: clang-format-14 is not offered here ($(cat /etc/debian_version 2>/dev/null || echo '?')); skipped" >&2
    exit 0
  fi
  scripts/install-deps.sh clang-format-14
fi
files=$(git ls-files '*.cpp' '*.h' | grep -v '^third_party/\|^tests/fixtures/')
if [ "${1:-}" = "--fix" ]; then
  # Twice: clang-format 14 settles some wrapped calls only on a second pass.
  echo "$files" | xargs clang-format-14 -i
  echo "$files" | xargs clang-format-14 -i
  exit 0
fi
echo "$files" | xargs clang-format-14 --dry-run --Werror
echo "check-format: $(echo "$files" | wc -l) files formatted as .clang-format says" >&2
