#pragma once

// The distributed-save scenarios, shared by the rank worker
// (dist_worker.cpp, one process per rank) and the test that compares its
// output with a single-process save of the full state dict.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/ops/cat.h>

#include <torchser/distributed.h>
#include <torchser/load.h>
#include <torchser/state_dict.h>

namespace torchser::testing {

// The full tensor `name` of `shape`: its values depend on the name only, so
// every rank (and the single-process save) builds the same one.
inline at::Tensor full_tensor(
    const std::string& name,
    std::vector<std::int64_t> shape,
    at::ScalarType dtype) {
  at::Generator gen = at::detail::createCPUGenerator(
      static_cast<std::uint64_t>(std::hash<std::string>{}(name)&0xffffffff));
  at::Tensor values =
      at::randn(shape, gen, at::TensorOptions().dtype(at::kDouble)) * 50;
  if (dtype == at::kBool) {
    return values > 0;
  }
  return values.to(dtype);
}

// Rows `rank` of `world` (torch.chunk's split) of dimension `dim`.
inline DistributedTensor chunk_of(
    const at::Tensor& full, std::int64_t dim, int rank, int world) {
  const auto [offset, size] = chunk_range(full.size(dim), rank, world);
  return {
      full.narrow(dim, offset, size).clone(),
      Placement::shard(dim, full.size(dim), offset)};
}

// "600" (bytes) or "5GB", as the worker's --max-shard-size takes it.
inline ShardSize shard_size(const std::string& text) {
  if (!text.empty() &&
      text.find_first_not_of("0123456789") == std::string::npos) {
    return ShardSize(static_cast<std::int64_t>(std::stoll(text)));
  }
  return ShardSize(text);
}

struct Scenario {
  StateDict full;             // what a single process would save
  DistributedStateDict local; // this rank's part
};

// "mixed": every placement kind and dtype: row, column and block splits
// (uneven, and empty pieces), replicated tensors, a tensor only the last
// rank holds, a tied weight split by rows, a non-contiguous local piece.
// "bad-overlap", "bad-hole", "bad-dtype", "bad-shape", "bad-tie": "mixed"
// with one rank's description broken.
// "dcp-fixture": the full tensors of tests/fixtures/dcp/world2 (PyTorch's
// DCP checkpoint), placed as its DTensors were (rows, columns, rows,
// replicated).
inline Scenario make_scenario(const std::string& name, int rank, int world) {
  Scenario s;
  if (name == "pipeline") {
    // Stage r holds layer r whole (pipeline parallel), its parameters views
    // of one flat buffer (as FSDP's flat parameters are); every stage
    // shares the embedding.
    const at::Tensor embed = full_tensor("embed", {6, 4}, at::kFloat);
    s.full.insert("embed.weight", embed);
    s.local.insert("embed.weight", {embed.clone(), Placement::replicate()});
    for (int stage = 0; stage < world; ++stage) {
      const std::string p = "layers." + std::to_string(stage) + ".";
      const at::Tensor w = full_tensor(p + "w", {5, 4}, at::kFloat);
      const at::Tensor b = full_tensor(p + "b", {5}, at::kFloat);
      s.full.insert(p + "w", w);
      s.full.insert(p + "b", b);
      if (stage == rank) {
        const at::Tensor flat = at::cat({w.flatten(), b});
        s.local.insert(
            p + "w",
            {flat.narrow(0, 0, 20).view({5, 4}), Placement::replicate()});
        s.local.insert(
            p + "b", {flat.narrow(0, 20, 5), Placement::replicate()});
      }
    }
    return s;
  }
  if (name == "dcp-fixture") {
    const std::string dir = std::string(TORCHSER_FIXTURES_DIR) + "/dcp/world2/";
    for (const char* file :
         {"model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors"}) {
      for (const auto& item : load_state_dict_from_file(dir + file)) {
        s.full.insert(item.key(), item.value());
      }
    }
    s.local.insert(
        "embed.weight", chunk_of(s.full["embed.weight"], 0, rank, world));
    s.local.insert(
        "proj.weight", chunk_of(s.full["proj.weight"], 1, rank, world));
    s.local.insert("proj.bias", chunk_of(s.full["proj.bias"], 0, rank, world));
    s.local.insert(
        "norm.weight", {s.full["norm.weight"].clone(), Placement::replicate()});
    return s;
  }
  const auto add_full = [&](const std::string& key, const at::Tensor& t) {
    s.full.insert(key, t);
  };
  if (name == "big" || name == "big-partial") {
    // 1 MiB tensors split by rows and columns, and a replicated one: what
    // each rank reads is measured against its share.
    const std::vector<std::pair<std::string, int>> tensors = {
        {"big.rows", 0},
        {"big.columns", 1},
        {"big.replicated", -1},
        {"big.more_rows", 0}};
    for (const auto& [key, how] : tensors) {
      const at::Tensor full = full_tensor(key, {256, 1024}, at::kFloat);
      add_full(key, full);
      // big-partial: the last rank holds only rows of the tensor the others
      // hold whole (a load may place each rank's tensors its own way).
      const bool partial =
          name == "big-partial" && how < 0 && rank == world - 1;
      s.local.insert(
          key,
          how >= 0 || partial
              ? chunk_of(full, partial ? 0 : how, rank, world)
              : DistributedTensor{full.clone(), Placement::replicate()});
    }
    return s;
  }
  // Tied, split by rows (a vocabulary-parallel embedding).
  const at::Tensor embed = full_tensor("embed", {37, 16}, at::kFloat);
  add_full("embed.weight", embed);
  DistributedTensor embed_local = chunk_of(embed, 0, rank, world);
  s.local.insert("embed.weight", embed_local);

  const std::vector<
      std::tuple<std::string, std::vector<std::int64_t>, at::ScalarType, int>>
      tensors = {
          // dim ≥ 0: split along it; -1: replicated; -2: block; -3: last rank
          // only
          {"layers.0.up.weight", {23, 16}, at::kFloat, 0},
          {"layers.0.down.weight", {16, 23}, at::kFloat, 1},
          {"layers.0.gate.weight", {10, 12}, at::kHalf, -2},
          {"layers.0.norm.weight", {16}, at::kBFloat16, -1},
          {"layers.0.mask", {5, 3}, at::kBool, 0},
          {"layers.0.counts", {9}, at::kShort, 0},
          {"layers.0.codes", {6, 5}, at::kChar, 1},
          {"layers.0.bytes", {7}, at::kByte, -1},
          {"layers.0.ids", {3, 4}, at::kInt, -3},
          {"layers.0.positions", {11}, at::kLong, -1},
          {"layers.0.scale", {}, at::kDouble, -1},
          {"layers.0.proj", {3, 5, 4}, at::kDouble, 1},
          {"layers.0.empty", {0, 4}, at::kFloat, 0},
          {"layers.0.tiny", {1, 6}, at::kFloat, 0},
      };
  for (const auto& [key, shape, dtype, how] : tensors) {
    const at::Tensor full = full_tensor(key, shape, dtype);
    add_full(key, full);
    if (how >= 0) {
      s.local.insert(key, chunk_of(full, how, rank, world));
    } else if (how == -1) {
      s.local.insert(key, {full.clone(), Placement::replicate()});
    } else if (how == -3) {
      if (rank == world - 1) {
        s.local.insert(key, {full.clone(), Placement::replicate()});
      }
    } else {
      // Blocks: rows split over ceil(world / 2), columns in two where a row
      // of blocks has two ranks.
      const int row_parts = (world + 1) / 2;
      const int row = rank / 2;
      const bool two_columns = rank / 2 * 2 + 1 < world;
      const auto [r0, rn] = chunk_range(full.size(0), row, row_parts);
      std::int64_t c0 = 0;
      std::int64_t cn = full.size(1);
      if (two_columns) {
        std::tie(c0, cn) = chunk_range(full.size(1), rank % 2, 2);
      }
      s.local.insert(
          key,
          {full.narrow(0, r0, rn).narrow(1, c0, cn).clone(),
           Placement::block({full.size(0), full.size(1)}, {r0, c0})});
    }
  }
  // A column piece held as a transposed (non-contiguous) view.
  {
    const at::Tensor full =
        full_tensor("layers.0.out.weight", {8, 9}, at::kFloat);
    add_full("layers.0.out.weight", full);
    const auto [offset, size] = chunk_range(9, rank, world);
    const at::Tensor transposed = full.narrow(1, offset, size).t().contiguous();
    s.local.insert(
        "layers.0.out.weight",
        {transposed.t(), Placement::shard(1, 9, offset)});
  }
  add_full("lm_head.weight", embed);
  s.local.insert("lm_head.weight", embed_local);

  if (name == "mixed") {
    return s;
  }
  const int victim = world - 1;
  if (rank != victim) {
    return s;
  }
  if (name == "bad-overlap") {
    // The last rank's rows start one row early.
    const at::Tensor full = s.full["layers.0.up.weight"];
    const auto [offset, size] = chunk_range(23, rank, world);
    s.local["layers.0.up.weight"] = {
        full.narrow(0, offset - 1, size).clone(),
        Placement::shard(0, 23, offset - 1)};
  } else if (name == "bad-hole") {
    const at::Tensor full = s.full["layers.0.up.weight"];
    const auto [offset, size] = chunk_range(23, rank, world);
    s.local["layers.0.up.weight"] = {
        full.narrow(0, offset, size - 1).clone(),
        Placement::shard(0, 23, offset)};
  } else if (name == "bad-dtype") {
    s.local["layers.0.norm.weight"].local =
        s.local["layers.0.norm.weight"].local.to(at::kFloat);
  } else if (name == "bad-shape") {
    const auto [offset, size] = chunk_range(23, rank, world);
    s.local["layers.0.up.weight"].placement = Placement::shard(0, 24, offset);
    (void)size;
  } else if (name == "bad-tie") {
    s.local["lm_head.weight"].local = s.local["lm_head.weight"].local.clone();
  }
  return s;
}

} // namespace torchser::testing
