#!/usr/bin/env bash
# Installs the judges, pinned, into build-judges/ (or $TORCHSER_JUDGES_DIR):
#   venv/          Python 3.11 with torch 2.13.0 (the CPU wheel on this
#                  machine's disk), safetensors, huggingface_hub,
#                  transformers (tests/judges/requirements.txt, the whole
#                  closure pinned)
#   node_modules/  the npm @huggingface/dduf checker (package-lock.json)
# Nothing is installed again while the pins are unchanged. About 1.2 GB in
# the venv, of which a few hundred MB are downloaded (torch comes from disk).
#
# Prints the variables the test suite reads, for `eval "$(tests/judges/setup.sh)"`:
#   TORCHSER_PYTHON, TORCHSER_NODE_MODULES, TORCHSER_TORCH_PREFIX
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${TORCHSER_JUDGES_DIR:-$root/build-judges}
mkdir -p "$dir"
log() { echo "judges: $*" >&2; }

# The torch wheel lies on disk for CPython 3.11 only: any other Python would
# make pip fetch a multi-GB CUDA build from the index, so refuse it.
python=""
for candidate in "${TORCHSER_JUDGES_PYTHON:-}" python3.11 python3; do
  [ -n "$candidate" ] || continue
  if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    python=$(command -v "$candidate")
    break
  fi
done
if [ -z "$python" ]; then
  log "no CPython 3.11 with venv found (set TORCHSER_JUDGES_PYTHON); the torch 2.13.0 CPU wheel on this"
  log "machine's disk is for 3.11, and any other Python would download a multi-GB CUDA build. Not installing."
  exit 1
fi

stamp_of() { cat "$here/requirements.txt" "$here/package-lock.json" | sha256sum | cut -c1-16; echo "$python"; }
want=$(stamp_of)
if [ "$(cat "$dir/stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$dir/venv" "$dir/node_modules" "$dir/stamp"
  log "creating $dir/venv with $python ($("$python" --version 2>&1))"
  "$python" -m venv "$dir/venv"
  # torch first, from local wheels only (pip's find-links: this machine's
  # /opt/wheels, or PIP_FIND_LINKS=DIR holding the CPU wheel): never the
  # index, whose Linux torch is a multi-GB CUDA build.
  if ! "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --no-index --no-deps \
      "$(grep '^torch==' "$here/requirements.txt")" 2> >(grep -v "^WARNING: Location" >&2); then
    log "no local CPU wheel of $(grep '^torch==' "$here/requirements.txt") for $("$python" --version 2>&1):"
    log "put one in a folder and set PIP_FIND_LINKS to it (the index would give a multi-GB CUDA build)"
    rm -rf "$dir/venv"
    exit 1
  fi
  # The rest from the index; --only-binary: every judge installs from a
  # wheel, nothing compiles.
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: \
    ${TORCHSER_JUDGES_PIP_ARGS:-} -r "$here/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
  "$dir/venv/bin/python" - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert not torch.version.cuda, "a CUDA build of torch was installed: refusing it"
PY
  command -v npm >/dev/null 2>&1 || "$root/scripts/install-deps.sh" nodejs npm
  cp "$here/package.json" "$here/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --silent --no-audit --no-fund >&2)
  echo "$want" >"$dir/stamp"
  log "installed: $(du -sh "$dir" | cut -f1)"
fi

prefix=$("$dir/venv/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
echo "export TORCHSER_PYTHON='$dir/venv/bin/python'"
echo "export TORCHSER_NODE_MODULES='$dir/node_modules'"
echo "export TORCHSER_TORCH_PREFIX='$prefix'"
