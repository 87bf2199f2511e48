"""The Python side of the judge tests (tests/judges_test.cpp): the real
safetensors, huggingface_hub, transformers and torch.distributed.checkpoint
packages read what torchser wrote and write what torchser reads.

Usage: judge.py COMMAND ARGS...   (each command prints one JSON line last)

Tensors are reported as {"dtype": safetensors code, "shape": [...],
"hex": raw little-endian bytes in hex}, so the C++ side compares bytes, not
approximations. The tensors of these tests are small.
"""
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings

import torch

CODES = {torch.complex128: "C128", torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL", torch.complex64: "C64"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
                     ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("float8_e8m0fnu", "F8_E8M0"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64"), ("float4_e2m1fn_x2", "F4")):
    if hasattr(torch, _name):
        CODES[getattr(torch, _name)] = _code
DTYPES = {code: dtype for dtype, code in CODES.items()}


def raw_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def describe(t):
    return {"dtype": CODES[t.dtype], "shape": list(t.shape), "hex": raw_bytes(t).hex()}


def describe_all(sd):
    return {name: describe(t) for name, t in sd.items()}


def emit(obj):
    print(json.dumps(obj, sort_keys=True))


def versions():
    out = {"torch": torch.__version__}
    for name in ("safetensors", "huggingface_hub", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


# --- safetensors ---------------------------------------------------------

def st_roundtrip(src, dst):
    """Reads SRC with the official reader (load_file, and safe_open for
    metadata and slices), then writes the same tensors and metadata with the
    official writer to DST."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    slices = {}
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
        for name in keys:
            sl = f.get_slice(name)
            shape = sl.get_shape()
            if len(shape) >= 1 and shape[0] >= 3:
                part = sl[1:3]
                slices[name] = describe(part)
                if len(shape) >= 2 and shape[1] >= 2:
                    slices[name + "[:, 1:]"] = describe(sl[:, 1:])
    save_file(tensors, dst, metadata=metadata)
    emit({"tensors": describe_all(tensors), "keys": keys, "metadata": metadata, "slices": slices,
          "versions": versions()})


def st_supported():
    """The safetensors codes the installed safetensors.torch maps to torch
    dtypes."""
    from safetensors import torch as st

    emit({"codes": sorted(st._TYPES), "versions": versions()})


# --- torch.save / torch.load ----------------------------------------------

def pickle_roundtrip(src, dst):
    """torch.load(SRC, weights_only=True), then torch.save of the same dict
    to DST (PyTorch's own writer: v2 and v3 tensors as it chooses)."""
    sd = torch.load(src, weights_only=True)
    torch.save(sd, dst)
    emit({"tensors": describe_all(sd), "versions": versions()})


# --- huggingface_hub -----------------------------------------------------

class Net(torch.nn.Module):
    """tests/tied_net.h's TiedNet: an embedding tied to the output
    layer, two linear blocks, a batch norm with its buffers."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight


def hub_save(directory, fmt, max_shard_size):
    from huggingface_hub import save_torch_model

    torch.manual_seed(1)
    net = Net()
    with torch.no_grad():
        net.norm.running_mean.uniform_()
        net.norm.running_var.uniform_(0.5, 2.0)
        net.norm.num_batches_tracked.fill_(7)
    save_torch_model(net, directory, safe_serialization=(fmt == "safetensors"), max_shard_size=int(max_shard_size))
    emit({"tensors": describe_all(net.state_dict()), "files": sorted(os.listdir(directory)),
          "versions": versions()})


def hub_load(directory, fmt, strict):
    from huggingface_hub import load_torch_model

    net = Net()
    with torch.no_grad():
        for p in net.state_dict().values():
            p.zero_()
    result = load_torch_model(net, directory, strict=strict == "strict", safe=(fmt == "safetensors"))
    emit({"tensors": describe_all(net.state_dict()), "tied": net.head.weight is net.embed.weight,
          "missing": sorted(getattr(result, "missing_keys", [])),
          "unexpected": sorted(getattr(result, "unexpected_keys", [])), "versions": versions()})


def hub_split(spec_path):
    """Plans every case of SPEC with split_torch_state_dict_into_shards. A case:
    {"storages": [{"dtype", "numel"}], "tensors": [{"name", "storage",
    "offset", "shape"}], "max_shard_size", "filename_pattern"}; a tensor is
    the contiguous run of its storage's elements at offset."""
    from huggingface_hub import split_torch_state_dict_into_shards

    plans = []
    for case in json.load(open(spec_path)):
        bases = [torch.zeros(s["numel"], dtype=DTYPES[s["dtype"]]) for s in case["storages"]]
        sd = {}
        for t in case["tensors"]:
            n = 1
            for d in t["shape"]:
                n *= d
            sd[t["name"]] = bases[t["storage"]][t["offset"]:t["offset"] + n].view(t["shape"])
        kwargs = {"max_shard_size": case["max_shard_size"]}
        if case.get("filename_pattern"):
            kwargs["filename_pattern"] = case["filename_pattern"]
        plan = split_torch_state_dict_into_shards(sd, **kwargs)
        # Pairs, so that the order of files and of names is compared too.
        plans.append({"filename_to_tensors": [[f, list(t)] for f, t in plan.filename_to_tensors.items()],
                      "tensor_to_filename": [[t, f] for t, f in plan.tensor_to_filename.items()],
                      "is_sharded": plan.is_sharded, "metadata": plan.metadata})
    emit({"plans": plans, "versions": versions()})


def hub_dduf(path):
    """read_dduf_file over a torchser archive: every entry's offset and length,
    its text for .json/.txt, and its tensors for .safetensors (through the
    entry's memory map, as diffusers reads it)."""
    from huggingface_hub import read_dduf_file
    from safetensors.torch import load as st_load

    entries = {}
    for name, entry in read_dduf_file(path).items():
        item = {"offset": entry.offset, "length": entry.length}
        if name.endswith((".json", ".txt")):
            item["text"] = entry.read_text()
        if name.endswith(".safetensors"):
            with entry.as_mmap() as mm:
                item["tensors"] = describe_all(st_load(bytes(mm)))
        entries[name] = item
    emit({"entries": entries, "versions": versions()})


def hub_cache(cache, queries_path):
    """try_to_load_from_cache for each (repo_id, filename, revision) query, and
    scan_cache_dir's view of the cache torchser's tests built."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    with open(queries_path) as f:
        queries = json.load(f)
    answers = []
    for repo_id, filename, revision in queries:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
        answers.append("no_exist" if found is _CACHED_NO_EXIST else found)
    repos = {}
    for repo in scan_cache_dir(cache).repos:
        repos[repo.repo_id] = {
            "revisions": sorted(r.commit_hash for r in repo.revisions),
            "refs": sorted(ref for r in repo.revisions for ref in r.refs),
            "files": sorted(f.file_name for r in repo.revisions for f in r.files)}
    emit({"answers": answers, "repos": repos, "versions": versions()})


def hub_local_dir(local_dir, commit, *files_and_etags):
    """Records downloads into a --local-dir folder with huggingface_hub's own
    write_download_metadata, and reads them back with read_download_metadata."""
    from pathlib import Path
    from huggingface_hub._local_folder import read_download_metadata, write_download_metadata

    out = {}
    pairs = list(zip(files_and_etags[::2], files_and_etags[1::2]))
    for filename, etag in pairs:
        write_download_metadata(Path(local_dir), filename, commit, etag)
    for filename, _ in pairs:
        m = read_download_metadata(Path(local_dir), filename)
        out[filename] = None if m is None else m.etag
    emit({"etags": out, "versions": versions()})


def crc32c(data):
    """CRC-32C (Castagnoli), bit by bit through a table: no torchser code."""
    table = getattr(crc32c, "table", None)
    if table is None:
        table = []
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table.append(c)
        crc32c.table = table
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def st_checksums(path):
    """The official reader over a checksummed file: its metadata, each tensor's
    dtype and the CRC-32C of its bytes computed here."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            t = f.get_tensor(name).contiguous()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out[name] = {"dtype": str(t.dtype), "crc32c": f"{crc32c(raw):08x}"}
    emit({"metadata": metadata, "tensors": out, "versions": versions()})


# --- transformers --------------------------------------------------------

def tf_model(arch):
    import transformers as tf

    if arch == "gpt2":  # tied input and output embeddings, Conv1D weights
        config = tf.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                eos_token_id=0)
        return tf.GPT2LMHeadModel, config
    if arch == "llama":  # untied, grouped-query attention, rotary
        config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                tie_word_embeddings=False)
        return tf.LlamaForCausalLM, config
    if arch == "qwen2":  # tied, biases on q/k/v
        config = tf.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                tie_word_embeddings=True)
        return tf.Qwen2ForCausalLM, config
    raise SystemExit(f"unknown architecture {arch}")


def tf_input():
    return torch.arange(12).reshape(2, 6) % 96


@contextlib.contextmanager
def captured_warnings():
    """Everything written to stderr (transformers' logger, Python warnings),
    captured at the descriptor, less the progress bars."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(sink.fileno(), 2)
        messages = []
        try:
            yield messages
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").replace("\r", "\n")
            messages += [line for line in text.splitlines()
                         if line.strip() and not line.startswith(("Loading weights", "Writing model shards"))]
            messages += [str(w.message) for w in caught]


def tf_save(directory, arch, max_shard_size):
    """A model from a config with random weights (no download), saved
    sharded with save_pretrained; prints its state dict and logits."""
    cls, config = tf_model(arch)
    torch.manual_seed(2)
    model = cls(config).eval()
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    with torch.no_grad():
        logits = model(tf_input()).logits
    emit({"files": sorted(os.listdir(directory)), "logits": describe(logits),
          "tensors": describe_all(model.state_dict()), "versions": versions()})


def tf_load(directory, arch):
    """from_pretrained on DIRECTORY: the logits, the loading report and
    every warning it logged."""
    cls, _ = tf_model(arch)
    with captured_warnings() as messages:
        model, info = cls.from_pretrained(directory, output_loading_info=True)
    model.eval()
    with torch.no_grad():
        logits = model(tf_input()).logits
    tied = None
    if hasattr(model, "lm_head"):
        tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    emit({"logits": describe(logits), "tied": tied,
          "missing": sorted(info.get("missing_keys", [])), "unexpected": sorted(info.get("unexpected_keys", [])),
          "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
          "error_msgs": [str(m) for m in info.get("error_msgs", [])],
          "warnings": messages, "versions": versions()})


# --- torch.distributed.checkpoint ----------------------------------------

def dcp_state_dict(rank, world, mesh, every_dtype=False):
    """A state dict of DTensors over a 1-D mesh: a row split, a column
    split, an uneven split, a replicated tensor (the values depend only on
    the full tensor, so every world size writes the same checkpoint).
    every_dtype adds split integer, bool and float16 tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(3)
    full = {
        "embed.weight": torch.randn(10, 6, generator=g),
        "proj.weight": torch.randn(4, 8, generator=g),
        "proj.bias": torch.randn(7, generator=g),
        "norm.weight": torch.randn(6, generator=g).to(torch.bfloat16),
    }
    placements = {"embed.weight": [Shard(0)], "proj.weight": [Shard(1)], "proj.bias": [Shard(0)],
                  "norm.weight": [Replicate()]}
    if every_dtype:
        full.update({
            "ids": torch.randint(-1000, 1000, (9, 3), generator=g, dtype=torch.int64),
            "counts": torch.randint(-100, 100, (5, 6), generator=g, dtype=torch.int32),
            "codes": torch.randint(-100, 100, (3, 7), generator=g, dtype=torch.int8),
            "mask": torch.randn(6, 5, generator=g) > 0,
            "half": torch.randn(4, 5, generator=g).to(torch.float16),
            "scale": torch.randn(3, 2, generator=g).to(torch.float64),
        })
        placements.update({"ids": [Shard(0)], "counts": [Shard(1)], "codes": [Shard(1)], "mask": [Shard(0)],
                           "half": [Shard(1)], "scale": [Replicate()]})
    return full, {k: distribute_tensor(v, mesh, placements[k]) for k, v in full.items()}


def dcp_worker(rank, world, port, directory, mode):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,))
        every_dtype = mode.endswith("-every-dtype")
        mode = mode.removesuffix("-every-dtype")
        full, sd = dcp_state_dict(rank, world, mesh, every_dtype)
        if mode == "write-sharded":
            # Only the per-rank shard files: PyTorch's own consolidation sizes
            # elements with torch.finfo, which integer and bool tensors lack.
            writer = HuggingFaceStorageWriter(directory, save_distributed=True, enable_consolidation=False,
                                              fqn_to_index_mapping={k: 1 + i % 2 for i, k in enumerate(full)})
            dcp.save(sd, storage_writer=writer)
            result = {"tensors": describe_all(full)}
        elif mode == "write":
            writer = HuggingFaceStorageWriter(directory, save_distributed=True, enable_consolidation=True,
                                              fqn_to_index_mapping={"embed.weight": 1, "proj.weight": 1,
                                                                    "proj.bias": 2, "norm.weight": 2})
            dcp.save(sd, storage_writer=writer)
            result = {"tensors": describe_all(full)}
        else:
            # Reads DIRECTORY (a plain Hub checkpoint) into this rank's shards.
            for v in sd.values():
                v.to_local().zero_()
            dcp.load(sd, storage_reader=HuggingFaceStorageReader(directory))
            local = {k: describe(v.to_local()) for k, v in sd.items()}
            # Every rank's pieces, for the resharding judge: through files
            # (rank 0 reads them after the barrier), not one more collective.
            mine = os.path.join(tempfile.gettempdir(), f"judge-dcp-{port}-rank{rank}.json")
            with open(mine, "w") as f:
                json.dump(local, f)
            result = {"tensors": describe_all({k: v.full_tensor() for k, v in sd.items()}), "local": local}
        dist.barrier()
        if rank == 0 and mode == "read":
            result["locals"] = []
            for r in range(world):
                path = os.path.join(tempfile.gettempdir(), f"judge-dcp-{port}-rank{r}.json")
                with open(path) as f:
                    result["locals"].append(json.load(f))
                os.unlink(path)
        dist.barrier()
        if rank == 0:
            emit(dict(result, versions=versions(), world_size=world))
    finally:
        dist.destroy_process_group()


def dcp(directory, mode, world="2"):
    """Runs WORLD processes of Gloo on 127.0.0.1 (a free port), each saving or
    loading its DTensor shards with HuggingFaceStorageWriter/Reader."""
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(dcp_worker, args=(int(world), port, directory, mode), nprocs=int(world), join=True,
                       start_method="spawn")


def torch_load_dir(directory):
    """torch.load(weights_only=True) of every .bin file of a directory, through
    its index when it has one; names sharing one storage are listed together."""
    index = os.path.join(directory, "pytorch_model.bin.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["pytorch_model.bin"]
    tensors, storages = {}, {}
    for name in files:
        for key, t in torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True).items():
            tensors[key] = t
            if t.untyped_storage().nbytes() > 0:  # empty storages have no address to compare
                storages.setdefault((name, t.untyped_storage().data_ptr()), []).append(key)
    emit({"tensors": describe_all(tensors), "files": files,
          "shared": sorted(sorted(v) for v in storages.values() if len(v) > 1), "versions": versions()})


# --- crash safety ----------------------------------------------------------

def kill_check(manifest_path):
    """Reads every directory of the manifest as users of the Hub do, knowing
    nothing of torchser: the index, then each shard it names through
    torch.load(weights_only=True) or safetensors.safe_open, then
    huggingface_hub.load_torch_model(strict=True). Tensor w{i} of generation g
    holds g + i: every directory must be one generation, one the manifest
    allows, with its config.json intact."""
    import huggingface_hub
    from safetensors import safe_open

    with open(manifest_path) as f:
        manifest = json.load(f)
    out = {"checked": 0, "mixed": [], "bad": [], "old": 0, "new": 0}
    for item in manifest:
        directory, fmt, allowed, count = item["dir"], item["format"], item["allowed"], item["tensors"]
        try:
            index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
            with open(os.path.join(directory, index_name)) as f:
                weight_map = json.load(f)["weight_map"]
            seen = {}
            for shard in sorted(set(weight_map.values())):
                path = os.path.join(directory, shard)
                if fmt == "safetensors":
                    with safe_open(path, framework="pt") as st:
                        for name in st.keys():
                            seen[name] = st.get_tensor(name)
                else:
                    seen.update(torch.load(path, weights_only=True))
            if sorted(seen) != sorted(weight_map):
                raise ValueError(f"the shards hold {sorted(seen)}, the index names {sorted(weight_map)}")
            gens = {float(seen[f"w{i}"][0]) - i for i in range(count)}
            module = torch.nn.Module()
            for i in range(count):
                module.register_parameter(f"w{i}", torch.nn.Parameter(torch.zeros_like(seen[f"w{i}"])))
            huggingface_hub.load_torch_model(module, directory, strict=True, safe=(fmt == "safetensors"))
            gens |= {float(getattr(module, f"w{i}")[0]) - i for i in range(count)}
            with open(os.path.join(directory, "config.json")) as f:
                if json.load(f) != {"model_type": "kill-test"}:
                    raise ValueError("config.json changed")
            if len(gens) != 1:
                out["mixed"].append({"dir": directory, "generations": sorted(gens)})
            else:
                g = gens.pop()
                if g not in allowed:
                    out["bad"].append({"dir": directory, "allowed": allowed, "seen": g})
                else:
                    out["new" if g == allowed[-1] else "old"] += 1
        except Exception as e:  # a directory no Hub reader can read is a failure too
            out["bad"].append({"dir": directory, "error": f"{type(e).__name__}: {e}"})
        out["checked"] += 1
    emit(out)


COMMANDS = {"kill-check": kill_check, "st-roundtrip": st_roundtrip, "pickle-roundtrip": pickle_roundtrip, "st-supported": st_supported, "hub-save": hub_save, "hub-load": hub_load,
            "hub-split": hub_split, "hub-dduf": hub_dduf, "hub-cache": hub_cache, "hub-local-dir": hub_local_dir, "st-checksums": st_checksums, "tf-save": tf_save, "tf-load": tf_load, "dcp": dcp,
            "torch-load-dir": torch_load_dir, "versions": lambda: emit(versions())}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: judge.py {{{','.join(COMMANDS)}}} ARGS...")
    COMMANDS[sys.argv[1]](*sys.argv[2:])
