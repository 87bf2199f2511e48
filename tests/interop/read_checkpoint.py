"""Reads a checkpoint torchser wrote, with Python's own tools, and prints a
JSON summary: {name: {"dtype", "shape", "sum"}} plus the groups of names that
share a storage (pickle files).

Usage: read_checkpoint.py PATH   (a file, or a directory with an index)

It uses huggingface_hub's and safetensors' loaders when they are importable
(the GPU machine has them), and otherwise torch plus a minimal safetensors
header reader, so that it runs wherever Python has torch.
"""
import inspect
import json
import os
import struct
import sys

import torch

try:
    import huggingface_hub
    from huggingface_hub import load_state_dict_from_file as hub_load
except Exception:  # not installed here
    hub_load = None
try:
    import safetensors
    from safetensors.torch import load_file as st_load
except Exception:
    st_load = None

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64, "C64": torch.complex64}


def read_safetensors(path):
    if st_load is not None:  # the official reader, the strictest
        return st_load(path)
    if hub_load is not None:
        return hub_load(path)
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
        begin, end = info["data_offsets"]
        raw = bytearray(data[8 + n + begin:8 + n + end])
        dtype = DTYPES[info["dtype"]]
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def read_file(path):
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if hub_load is not None:
        # huggingface_hub 2.x loads pickle files only when told safe=False.
        if "safe" in inspect.signature(hub_load).parameters:
            return hub_load(path, weights_only=True, safe=False)
        return hub_load(path, weights_only=True)
    return torch.load(path, weights_only=True)


def main(path):
    files = [path]
    if os.path.isdir(path):
        index = [f for f in os.listdir(path) if f.endswith(".index.json")]
        if index:
            weight_map = json.load(open(os.path.join(path, index[0])))["weight_map"]
            files = sorted({os.path.join(path, f) for f in weight_map.values()})
        else:
            files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))]
    summary, sharing = {}, []
    for f in files:
        sd = read_file(f)
        by_storage = {}
        for name, t in sd.items():
            summary[name] = {"dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape),
                             "sum": float(t.double().sum()) if not t.is_complex() else float(t.abs().double().sum())}
            if t.numel():
                by_storage.setdefault(t.storage().data_ptr(), []).append(name)
        sharing += [sorted(names) for names in by_storage.values() if len(names) > 1]
    print(json.dumps({"tensors": summary, "sharing": sorted(sharing),
                      "tools": {"huggingface_hub": huggingface_hub.__version__ if hub_load else None,
                                "safetensors": safetensors.__version__ if st_load else None,
                                "torch": torch.__version__}}))


if __name__ == "__main__":
    main(sys.argv[1])
