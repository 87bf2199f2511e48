#!/usr/bin/env bash
# Run here (Debian 12), before tests/device/check.sh: downloads the Debian
# packages the GPU machine's image lacks (it reaches no registry) into
# .device-debs/, which git ignores and the device call carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device-debs
cd .device-debs
apt-get download nlohmann-json3-dev libzip-dev libzip4 libisal-dev libisal2 libcli11-dev \
  libgtest-dev libgmock-dev pkgconf pkgconf-bin libpkgconf3 libssl-dev libgloo-dev liburing-dev liburing2 >/dev/null
ls
