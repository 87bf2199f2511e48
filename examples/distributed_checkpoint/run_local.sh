#!/usr/bin/env bash
# Starts N ranks of distributed_checkpoint on 127.0.0.1 with torchrun's
# variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
# MASTER_PORT), waits for all of them, and exits 0 only when every rank did.
#
# Usage: examples/distributed_checkpoint/run_local.sh N ARGS...
#   e.g. run_local.sh 2 --save /tmp/ckpt --max-shard-size 3MB
# DISTRIBUTED_CHECKPOINT names the program (default: build/examples/
# distributed_checkpoint); MASTER_PORT, when set, the rendezvous port.
set -euo pipefail
if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N ARGS..." >&2
  exit 2
fi
n=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
program=${DISTRIBUTED_CHECKPOINT:-$here/../../build/examples/distributed_checkpoint}
if [ ! -x "$program" ]; then
  echo "run_local.sh: $program is not built (cmake --build build, or set DISTRIBUTED_CHECKPOINT)" >&2
  exit 2
fi
if [ -z "${MASTER_PORT:-}" ]; then
  # A port the kernel just handed out and released.
  MASTER_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
                echo $((20000 + RANDOM % 20000)))
fi
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((r = 0; r < n; r++)); do
  MASTER_ADDR=127.0.0.1 MASTER_PORT=$MASTER_PORT RANK=$r LOCAL_RANK=$r WORLD_SIZE=$n \
    LOCAL_WORLD_SIZE=$n OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$program" "$@" &
  pids+=($!)
done
status=0
for ((r = 0; r < n; r++)); do
  if ! wait "${pids[$r]}"; then
    echo "run_local.sh: rank $r failed" >&2
    status=1
  fi
done
exit $status
