#!/usr/bin/env bash
# The distributed_checkpoint example as a user runs it: saved by 2 and 3
# ranks through run_local.sh (torchrun's variables, TCP rendezvous on
# 127.0.0.1), and by one process with the plain save_torch_model; the
# directories must be identical byte for byte and hold several shards.
# Then --load: each checkpoint loaded by other world sizes (resharding),
# every rank comparing its part with the expected values.
#
# Usage: distributed_example_test.sh PROGRAM SOURCE_DIR
set -euo pipefail
program=$1
source_dir=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DISTRIBUTED_CHECKPOINT=$program
WORLD_SIZE=1 "$program" --save "$work/one" --max-shard-size 3MB
for n in 2 3; do
  timeout 300 "$source_dir/examples/distributed_checkpoint/run_local.sh" "$n" \
    --save "$work/ranks$n" --max-shard-size 3MB --timeout 120
  diff -r "$work/one" "$work/ranks$n"
done
shards=$(find "$work/one" -name 'model-*-of-*.safetensors' | wc -l)
if [ "$shards" -lt 4 ]; then
  echo "expected several shards with --max-shard-size 3MB, got $shards" >&2
  exit 1
fi
# Saving again over a checkpoint replaces it whole.
timeout 300 "$source_dir/examples/distributed_checkpoint/run_local.sh" 2 \
  --save "$work/one" --max-shard-size 5MB --timeout 120
if find "$work" -name '*.torchser-*' | grep -q .; then
  echo "temporaries left behind" >&2
  exit 1
fi
# Loads reshard: what 3 ranks saved into 1, 2 and 4 ranks, what one
# process saved into 3.
WORLD_SIZE=1 "$program" --load "$work/ranks3"
for n in 2 4; do
  timeout 300 "$source_dir/examples/distributed_checkpoint/run_local.sh" "$n" \
    --load "$work/ranks3" --timeout 120
done
timeout 300 "$source_dir/examples/distributed_checkpoint/run_local.sh" 3 \
  --load "$work/one" --timeout 120
echo "distributed_checkpoint: 1, 2 and 3 ranks wrote identical checkpoints ($shards shards); 1, 2, 3 and 4 ranks loaded them"
