"""Writes a checkpoint with Python's own tools for torchser to read, and
prints what it wrote as JSON: {name: {"dtype", "shape", "sum"}}.

Usage: write_checkpoint.py DIRECTORY

With huggingface_hub importable (the GPU machine), a sharded pickle
checkpoint through save_torch_state_dict(safe_serialization=False); without
it, shards written with torch.save and an index written as huggingface_hub
writes it.
"""
import json
import os
import sys

import torch
import torch.nn as nn

try:
    from huggingface_hub import save_torch_state_dict
except Exception:
    save_torch_state_dict = None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied


def main(directory):
    torch.manual_seed(0)
    net = Net()
    net.norm.running_mean.uniform_()
    sd = net.state_dict()
    if save_torch_state_dict is not None:
        save_torch_state_dict(sd, directory, safe_serialization=False, max_shard_size=800)
    else:
        names = list(sd)
        shards = [names[:3], names[3:6], names[6:]]
        weight_map = {}
        for i, shard in enumerate(shards):
            filename = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
            # Tied names stay in one file, as huggingface_hub's planner keeps them.
            torch.save({n: sd[n] for n in shard}, os.path.join(directory, filename))
            weight_map.update({n: filename for n in shard})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(json.dumps({name: {"dtype": str(t.dtype).split(".")[-1], "shape": list(t.shape),
                             "sum": float(t.double().sum())} for name, t in sd.items()}))


if __name__ == "__main__":
    main(sys.argv[1])
