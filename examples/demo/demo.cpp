// torchser's end-to-end demo on a small built-in model.
//
// It trains a small language model for a few steps, plans its shards
// exactly as huggingface_hub would, saves it sharded (safetensors + index,
// the tied output layer stored once), reloads it strictly into a freshly
// initialised model and shows that the outputs match, then exports it as a
// DDUF archive and loads a model from the archive entry.
//
// Usage: torchser_demo [--max-shard-size SIZE] [--dir DIR]
//        (defaults: 200KB, a new temporary directory)

#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>
#include <unordered_map>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include <torch/nn/functional/loss.h>
#include <torch/optim/adam.h>
#include <torch/utils.h>

#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/save.h>
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
  std::filesystem::path directory;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--max-shard-size" && i + 1 < argc) {
      max_shard_size = argv[++i];
    } else if (arg == "--dir" && i + 1 < argc) {
      directory = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      std::cout
          << "usage: torchser_demo [--max-shard-size SIZE] [--dir DIR]\n"
             "  (defaults: 200KB, a new directory under the system temp dir)\n";
      return 0;
    } else {
      std::cerr << "torchser_demo: unknown argument '" << arg
                << "' (try --help)\n";
      return 2;
    }
  }

  torch::manual_seed(0);
  demo::TinyLM model;

  // 1. Train for a few steps on a toy task: predict token + 1.
  torch::optim::Adam optimizer(
      model->parameters(), torch::optim::AdamOptions(3e-3));
  const auto inputs = torch::randint(0, 511, {16, 12});
  const auto targets = inputs + 1;
  std::cout << "Training TinyLM for 30 steps:";
  for (int step = 1; step <= 30; ++step) {
    optimizer.zero_grad();
    const auto logits = model->forward(inputs);
    const auto loss = torch::nn::functional::cross_entropy(
        logits.reshape({-1, logits.size(2)}), targets.reshape({-1}));
    loss.backward();
    optimizer.step();
    if (step == 1 || step % 10 == 0) {
      std::printf(" step %d loss %.3f;", step, loss.item<double>());
    }
  }
  std::cout << "\n\n";
  model->eval();

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
      << "; each storage counted once, so the tied lm_head adds nothing)\n\n";

  // 2. Save it sharded, as huggingface_hub's save_torch_model would.
  if (directory.empty()) {
    directory = std::filesystem::temp_directory_path() /
                ("torchser-demo-" + std::to_string(::getpid()));
  }
  std::filesystem::create_directories(directory);
  torchser::save_torch_model(
      *model,
      directory,
      torchser::SaveOptions().max_shard_size(max_shard_size));
  std::cout << "Saved with save_torch_model to " << directory.string() << ":\n";
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    std::cout << "  " << file.filename().string() << "  "
              << human_bytes(static_cast<std::int64_t>(
                     std::filesystem::file_size(file)))
              << "\n";
  }

  // 3. Reload strictly into a freshly initialised model and compare outputs.
  torch::manual_seed(1);
  demo::TinyLM fresh;
  fresh->eval();
  const auto reference = model->forward(inputs);
  const double before =
      (fresh->forward(inputs) - reference).abs().max().item<double>();
  const auto result = torchser::load_torch_model(
      *fresh, directory, torchser::LoadOptions().strict(true));
  const double after =
      (fresh->forward(inputs) - reference).abs().max().item<double>();
  const bool tied = torchser::get_torch_storage_id(fresh->lm_head->weight) ==
                    torchser::get_torch_storage_id(fresh->embed->weight);
  std::printf(
      "\nReloaded strictly into a fresh TinyLM with load_torch_model: %zu "
      "missing, %zu unexpected keys;\n"
      "lm_head.weight (stored once, as an alias in the index metadata) "
      "re-tied: %s\n"
      "max |output difference| vs the trained model: %.6f before loading, %.6f "
      "after\n",
      result.missing_keys.size(),
      result.unexpected_keys.size(),
      tied ? "yes, one storage" : "no",
      before,
      after);
  if (after != 0.0) {
    return 1;
  }

  // 4. Export it as a one-file DDUF pipeline, streamed straight from the
  // model, and load a third model from the archive entry without a copy.
  const auto dduf = directory / "tiny_pipeline.dduf";
  torchser::export_entries_as_dduf(
      dduf,
      {torchser::DDUFExportEntry::from_bytes(
           "model_index.json",
           R"({"_class_name": "TinyPipeline", "lm": ["torchser_demo", "TinyLM"]})"),
       torchser::DDUFExportEntry::from_bytes(
           "lm/config.json",
           R"({"vocab_size": 512, "hidden_size": 64, "num_layers": 2})"),
       torchser::DDUFExportEntry::from_state_dict(
           "lm/model.safetensors", torchser::state_dict(*model))});
  const auto entries = torchser::read_dduf_file(dduf);
  std::cout << "\nExported " << dduf.filename().string() << " ("
            << human_bytes(
                   static_cast<std::int64_t>(std::filesystem::file_size(dduf)))
            << "):\n";
  for (const auto& entry : entries) {
    std::cout << "  " << entry.value().repr() << "\n";
  }
  torch::manual_seed(2);
  demo::TinyLM from_dduf;
  from_dduf->eval();
  torchser::load_torch_model_from_dduf_entry(
      *from_dduf,
      entries["lm/model.safetensors"],
      torchser::LoadOptions().strict(true));
  const double from_archive =
      (from_dduf->forward(inputs) - reference).abs().max().item<double>();
  std::printf(
      "Loaded from the DDUF entry: max |output difference| %.6f\n",
      from_archive);
  return from_archive == 0.0 ? 0 : 1;
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
