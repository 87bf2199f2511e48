#!/usr/bin/env bash
# Builds torchser and runs the whole test suite (README, command 2).
# Installs what is missing first.
#
# Usage: ./test.sh              normal build in build/
#        ./test.sh --sanitize   AddressSanitizer + UBSan build in build-sanitize/
set -euo pipefail
cd "$(dirname "$0")"

build_dir=build
cmake_args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ "${1:-}" = "--sanitize" ]; then
  build_dir=build-sanitize
  cmake_args=(-DCMAKE_BUILD_TYPE=Debug -DTORCHSER_SANITIZE=ON)
fi

# python3-torch: the interoperability tests run Python's torch.save/torch.load;
# unzip: they check the archives torchser writes with `unzip -t`; doxygen: the
# docs_complete test (every public declaration documented).
scripts/install-deps.sh python3-torch unzip doxygen
cmake -S . -B "$build_dir" -G Ninja "${cmake_args[@]}" >/dev/null
cmake --build "$build_dir"
# LeakSanitizer and UBSan report through these; a finding fails the test.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
ctest --test-dir "$build_dir" -j2 --output-on-failure
