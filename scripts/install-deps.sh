#!/usr/bin/env bash
# Installs the Debian packages torchser needs to build and test, and only
# those that are missing (apt-get, through sudo when not root).
#
# Usage: scripts/install-deps.sh [extra-package ...]
set -euo pipefail

packages=(
  g++ cmake ninja-build pkg-config ccache
  libtorch-dev nlohmann-json3-dev libzip-dev libisal-dev libcli11-dev libssl-dev libgloo-dev liburing-dev
  libgtest-dev libgmock-dev
  "$@"
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: missing packages (${missing[*]}) and no apt-get: install them by hand" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  sudo=(sudo)
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# Say which package this release does not offer, rather than apt's error.
unavailable=()
for p in "${missing[@]}"; do
  candidate=$(apt-cache policy "$p" 2>/dev/null | sed -n 's/^ *Candidate: //p')
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    unavailable+=("$p")
  fi
done
if [ ${#unavailable[@]} -gt 0 ]; then
  echo "install-deps: Debian $(cat /etc/debian_version 2>/dev/null || echo '?') offers no package" \
       "${unavailable[*]} (apt-cache policy shows no candidate); install it by hand or use Debian 12 or 13" >&2
  exit 1
fi
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
