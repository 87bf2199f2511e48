#!/usr/bin/env bash
# Runs every benchmark program in one go on this machine and prints one
# markdown report (the README's Performance tables come from it). Python
# figures appear when /usr/bin/python3 has torch (and huggingface_hub, for
# the planner and DDUF columns).
#
# Usage: tests/bench/report.sh [BUILD_DIR] > report.md     (default BUILD_DIR: build)
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
cmake --build "$build" --target torchser_bench_split torchser_bench_safetensors torchser_bench_pickle \
  torchser_bench_model torchser_bench_dduf >&2
bench="$build/tests/bench"
echo "# torchser benchmark report"
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r); every ratio compares two figures of the same run."
for name in split safetensors pickle model dduf; do
  echo
  echo "## ${name}"
  echo
  "$bench/torchser_bench_${name}"
done
