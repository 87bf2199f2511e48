#!/usr/bin/env bash
# Regenerates tests/fixtures/dcp/ with the real torch.distributed.checkpoint
# (the judges' PyTorch 2.13): 2 processes on Gloo over 127.0.0.1 save a state
# dict of DTensors (row, column and uneven splits, a replicated tensor) with
# HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True).
#   world2/sharded/   each rank's shard files, DCP_SHARDING_INFO offsets in the
#                     safetensors metadata (the input of resharding on load)
#   world2/           the consolidated Hub checkpoint and its index
#   world2/expected.json  every full tensor: dtype, shape, bytes in hex
# And tests/fixtures/torch2/new_dtypes.bin: torch.save of every dtype PyTorch
# 2.x pickles with _rebuild_tensor_v3 (float8, uint16..64, float4), with its
# expected.json.
# The test suite reads the committed files (JudgeTest.*Dcp*,
# PickleFixtureTest.PyTorch2Dtypes*); run this only when the generator
# changes, and commit what it writes.
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(tests/judges/setup.sh)"
out=tests/fixtures/dcp/world2
rm -rf "$out"
mkdir -p "$out"
"$TORCHSER_PYTHON" tests/judges/judge.py dcp "$out" write 2 2> >(grep -v "^WARNING: Location" >&2) | tail -1 |
  "$TORCHSER_PYTHON" -c 'import json, sys; d = json.load(sys.stdin); json.dump({"tensors": d["tensors"], "versions": d["versions"], "world_size": d["world_size"]}, sys.stdout, indent=1, sort_keys=True)' \
  >"$out/expected.json"
mkdir -p tests/fixtures/torch2
"$TORCHSER_PYTHON" - 2> >(grep -v "^WARNING: Location" >&2) <<'PY'
import json, sys
sys.path.insert(0, "tests/judges")
import torch
from judge import describe_all, versions
g = torch.Generator().manual_seed(7)
raw = lambda n: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
sd = {"plain": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
for name in ("float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "uint16", "uint32", "uint64",
             "float8_e8m0fnu", "float4_e2m1fn_x2"):
    dtype = getattr(torch, name)
    size = torch.empty(0, dtype=dtype).element_size()
    sd[name] = raw(6 * size).view(dtype).reshape(2, 3)
sd["float8_e4m3fn_view"] = sd["float8_e4m3fn"][:, 1:]
torch.save(sd, "tests/fixtures/torch2/new_dtypes.bin")
json.dump({"tensors": describe_all(sd), "versions": versions()},
          open("tests/fixtures/torch2/expected.json", "w"), indent=1, sort_keys=True)
PY
find "$out" tests/fixtures/torch2 -type f | sort
