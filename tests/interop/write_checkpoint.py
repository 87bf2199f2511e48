"""Writes a checkpoint with Python's own tools for torchser to read, and
prints what it wrote as JSON: {name: {"dtype", "shape", "sum"}}.

Usage: write_checkpoint.py DIRECTORY [pickle|safetensors]

With huggingface_hub importable (the GPU machine), a sharded checkpoint
through save_torch_state_dict; without it, shards written with torch.save (or
a minimal safetensors writer) and an index written as huggingface_hub writes
it. Tied tensors are stored once in safetensors shards, as huggingface_hub
does. The JSON says which tool wrote the files.
"""
import json
import os
import struct
import sys

import torch
import torch.nn as nn

try:
    import huggingface_hub
    from huggingface_hub import save_torch_state_dict
except Exception:
    save_torch_state_dict = None

CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
         torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}


def write_safetensors(tensors, path):
    """The format's rules, written independently of torchser: a JSON header
    padded with spaces to 8 bytes, then the tensors in order."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied


def main(directory, fmt):
    torch.manual_seed(0)
    net = Net()
    net.norm.running_mean.uniform_()
    sd = net.state_dict()
    # Summarised before saving: huggingface_hub 2.x's safetensors path removes
    # the tied duplicates from the dict it is given.
    summary = {name: {"dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape), "sum": float(t.double().sum())}
               for name, t in sd.items()}
    safe = fmt == "safetensors"
    if save_torch_state_dict is not None:
        save_torch_state_dict(sd, directory, safe_serialization=safe, max_shard_size=800)
        tool = f"huggingface_hub {huggingface_hub.__version__} save_torch_state_dict"
    else:
        names = list(sd)
        if safe:  # tied tensors once, under their first name
            seen = set()
            names = [n for n in names if not (sd[n].data_ptr() in seen or seen.add(sd[n].data_ptr()))]
        shards = [names[:3], names[3:6], names[6:]]
        weight_map = {}
        for i, shard in enumerate(shards):
            if safe:
                filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors({n: sd[n] for n in shard}, os.path.join(directory, filename))
            else:
                filename = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                # Tied names stay in one file, as huggingface_hub's planner keeps them.
                torch.save({n: sd[n] for n in shard}, os.path.join(directory, filename))
            weight_map.update({n: filename for n in shard})
        total = sum(sd[n].numel() * sd[n].element_size() for n in names)
        index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
        with open(os.path.join(directory, index), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        tool = f"torch {torch.__version__} " + ("and a minimal safetensors writer" if safe else "torch.save")
    print(json.dumps({"tool": tool, "tensors": summary}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "pickle")
