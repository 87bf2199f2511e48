#!/usr/bin/env bash
# Builds the libFuzzer targets (clang: scripts/pick-clang.sh, ASan + UBSan) and runs each for a
# bounded time on its seed corpus (tests/fuzz/corpus and the reference
# fixtures) with the format dictionary. A crash fails the run; its input is
# copied to tests/fuzz/regressions/<target>/, which the test suite replays
# (FuzzRegressionTest) once the input is committed.
#
# Usage: tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60, all)
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors_header safetensors_file index_json dduf torch_load_file pickle_vm)

clang=$(scripts/pick-clang.sh)
scripts/install-deps.sh "clang-$clang" "libclang-rt-$clang-dev"
echo "fuzz: clang-$clang" >&2
build=build-fuzz
CC=clang-$clang CXX=clang++-$clang cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTORCHSER_FUZZ=ON -DBUILD_SHARED_LIBS=OFF -DTORCHSER_BUILD_TESTS=OFF -DTORCHSER_BUILD_EXAMPLES=OFF \
  -DTORCHSER_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$build" --target $(printf 'fuzz_%s ' "${targets[@]}")

fixtures=tests/fixtures
seeds_of() {
  case $1 in
    safetensors_header|safetensors_file) echo tests/fuzz/corpus/safetensors $fixtures/safetensors-official-2022 ;;
    index_json) echo tests/fuzz/corpus/index_json ;;
    dduf) echo $fixtures/reference/dduf ;;
    torch_load_file) echo $fixtures/reference/pickle $fixtures/reference/pickle/sharded $fixtures/torch2 ;;
    pickle_vm) echo tests/fuzz/corpus/pickle_vm ;;
  esac
}

export ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
status=0
summary=()
for target in "${targets[@]}"; do
  work=$(mktemp -d)
  # The corpus grows in a scratch folder; the committed seeds stay as they are.
  mkdir -p "$work/corpus" "$work/artifacts"
  log="$work/log"
  echo "fuzz_${target}: ${seconds}s" >&2
  if "$build/tests/fuzz/fuzz_${target}" "$work/corpus" $(seeds_of "$target") \
      -dict=tests/fuzz/formats.dict -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 \
      -timeout=10 -artifact_prefix="$work/artifacts/" -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
    mkdir -p "tests/fuzz/regressions/$target"
    cp "$work"/artifacts/* "tests/fuzz/regressions/$target/" 2>/dev/null || true
    tail -60 "$log" >&2
    # The input, recoverable from a CI log: base64 -d > tests/fuzz/regressions/<target>/<name>
    for f in "$work"/artifacts/*; do
      [ -f "$f" ] && { echo "--- $(basename "$f") (base64)" >&2; base64 -w 120 "$f" | head -c 200000 >&2; echo >&2; }
    done
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
  corpus=$(ls "$work/corpus" | wc -l)
  summary+=("| fuzz_${target} | ${seconds} s | ${runs} | ${cov} | ${corpus} | ${result} |")
  rm -rf "$work"
done
echo "| target | time | executions | coverage (edges) | corpus | result |"
echo "|---|---:|---:|---:|---:|---|"
printf '%s\n' "${summary[@]}"
exit $status
