#!/usr/bin/env bash
# Installs the built torchser into a scratch prefix, then configures, builds
# and runs examples/consumer against it through find_package(torchser).
#
# Usage: install_consumer_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build_dir=$1
source_dir=$2
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Quiet unless a step fails; then its output.
quiet() { "$@" >"$scratch/log" 2>&1 || { cat "$scratch/log" >&2; echo "failed: $*" >&2; return 1; }; }
quiet cmake --install "$build_dir" --prefix "$scratch/prefix"
# Only torchser's prefix: the installed package finds the LibTorch it was
# built against by itself (the wheel's, where the system has another).
quiet cmake -S "$source_dir/examples/consumer" -B "$scratch/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$scratch/prefix"
quiet cmake --build "$scratch/build"
"$scratch/build/consumer"
# The installed command-line tool starts from this prefix without
# LD_LIBRARY_PATH (its RPATH finds libtorchser and LibTorch).
env -u LD_LIBRARY_PATH "$scratch/prefix/bin/torchser" --help >/dev/null
# The install holds the public headers and nothing private.
test -f "$scratch/prefix/include/torchser/split.h"
test -f "$scratch/prefix/include/torchser/version.h"
test ! -e "$scratch/prefix/include/torchser/detail"
if grep -rqE '#include <(nlohmann|zip)' "$scratch/prefix/include/torchser"; then
  echo "a public header includes a private dependency" >&2
  exit 1
fi
