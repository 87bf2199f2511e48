#!/usr/bin/env bash
# torchser's end-to-end demo on a small built-in model (README, command 1).
# Installs what is missing, builds, and runs. Arguments go to the demo
# (try --help).
set -euo pipefail
cd "$(dirname "$0")"
scripts/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build --target torchser_demo
exec build/examples/torchser_demo "$@"
