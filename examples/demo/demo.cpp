// torchser's end-to-end demo on a small built-in model.
//
// Today it plans the model's shards exactly as huggingface_hub would and
// prints the plan; the save, load and DDUF steps join as they land.
//
// Usage: torchser_demo [--max-shard-size SIZE]   (default 200KB)

#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <unordered_map>

#include <torchser/errors.h>
#include <torchser/module.h>
#include <torchser/split.h>
#include <torchser/storage.h>

#include "tiny_lm.h"

namespace {

std::string human_bytes(std::int64_t bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1000.0 && unit < 4) {
    value /= 1000.0;
    ++unit;
  }
  char buffer[32];
  std::snprintf(
      buffer,
      sizeof buffer,
      unit == 0 ? "%.0f %s" : "%.1f %s",
      value,
      units[unit]);
  return buffer;
}

int run(int argc, char** argv) {
  torchser::ShardSize max_shard_size = "200KB";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--max-shard-size" && i + 1 < argc) {
      max_shard_size = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      std::cout
          << "usage: torchser_demo [--max-shard-size SIZE]  (default 200KB)\n";
      return 0;
    } else {
      std::cerr << "torchser_demo: unknown argument '" << arg
                << "' (try --help)\n";
      return 2;
    }
  }

  const demo::TinyLM model;
  const torchser::StateDict sd = torchser::state_dict(*model);
  std::cout << "TinyLM: " << sd.size()
            << " tensors; lm_head.weight is tied to embed.weight: "
            << (torchser::get_torch_storage_id(sd["lm_head.weight"]) ==
                        torchser::get_torch_storage_id(sd["embed.weight"])
                    ? "yes"
                    : "no")
            << "\n\n";

  const auto split = torchser::split_torch_state_dict_into_shards(
      sd, torchser::SplitOptions().max_shard_size(max_shard_size));
  std::cout << "Shard plan (max_shard_size "
            << human_bytes(max_shard_size.bytes())
            << ", the plan huggingface_hub's "
               "split_torch_state_dict_into_shards gives):\n";
  for (const auto& shard : split.filename_to_tensors) {
    // A file stores each storage once: aliases (the tied lm_head) add no bytes.
    std::unordered_map<torchser::StorageId, std::string> owner;
    std::int64_t bytes = 0;
    for (const auto& name : shard.value()) {
      const auto id = *torchser::get_torch_storage_id(sd[name]);
      if (owner.emplace(id, name).second) {
        bytes += id.nbytes;
      }
    }
    std::cout << "  " << shard.key() << "  " << shard.value().size()
              << " tensors, " << human_bytes(bytes) << "\n";
    for (const auto& name : shard.value()) {
      const auto& first = owner.at(*torchser::get_torch_storage_id(sd[name]));
      std::cout << "      " << name << " " << sd[name].sizes();
      if (first != name) {
        std::cout << "  (shares storage with " << first << ")";
      }
      std::cout << "\n";
    }
  }
  std::cout
      << "\nis_sharded: " << (split.is_sharded ? "true" : "false")
      << "\ntotal_size: " << split.metadata.total_size << " bytes ("
      << human_bytes(split.metadata.total_size)
      << "; each storage counted once, so the tied lm_head adds nothing)\n";
  return 0;
}

} // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const torchser::Error& e) {
    std::cerr << "torchser_demo: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "torchser_demo: unexpected error: " << e.what() << "\n";
    return 1;
  }
}
