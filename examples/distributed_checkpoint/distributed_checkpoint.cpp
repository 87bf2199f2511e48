// Job 4: save a model trained across processes, rank-parallel, straight into
// the Hub's sharded safetensors layout.
//
// Started as WORLD_SIZE processes with torchrun's variables (RANK,
// WORLD_SIZE, MASTER_ADDR, MASTER_PORT; run_local.sh N ARGS... starts N on
// 127.0.0.1). Every rank builds the same deterministic model (fixed seeds:
// the full weights do not depend on the world size), keeps its part of it
// (tensor parallel: rows of the embedding and of the column-parallel
// projections, columns of the row-parallel ones, the norms replicated) and
// saves its part. The directory is byte for byte what one process saving the
// whole model writes: with WORLD_SIZE=1 (or unset) the program does exactly
// that, with the plain save_torch_model, so the two can be compared.
//
// With --load DIR, every rank builds the same model with zeroed tensors,
// loads DIR into its part of it (whatever world size, or single process,
// saved DIR: each rank reads only its pieces' bytes), compares every local
// tensor with the expected values, and prints the bytes it read.
//
// Usage: distributed_checkpoint --save DIR [--max-shard-size SIZE]
//                               [--timeout SECONDS]
//        distributed_checkpoint --load DIR [--timeout SECONDS]
// Every rank exits 0 only when the checkpoint was committed (--save), or
// when every local tensor matches (--load).

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <torchser/distributed.h>
#include <torchser/distributed_load.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/process_group.h>
#include <torchser/save.h>

namespace {

constexpr std::int64_t kVocab = 4096;
constexpr std::int64_t kHidden = 512;
constexpr std::int64_t kMlp = 1024;
constexpr int kLayers = 4;

// A stable seed per tensor name (FNV-1a), so each full tensor has the same
// values on every rank and for every world size.
std::uint64_t seed_of(const std::string& name) {
  std::uint64_t h = 1469598103934665603ull;
  for (const char c : name) {
    h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  }
  return h;
}

at::Tensor full_weight(
    const std::string& name, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Generator gen = at::detail::createCPUGenerator(seed_of(name));
  return (at::randn(shape, gen) * 0.02).to(dtype);
}

struct Part {
  torch::nn::Module* owner;
  std::string name;      // inside owner
  std::string full_name; // in the state dict
  std::vector<std::int64_t> shape;
  at::ScalarType dtype;
  int split_dim; // -1: replicated
  bool buffer = false;
};

// The model, holding this rank's part of every tensor.
struct ExampleLM {
  std::shared_ptr<torch::nn::Module> root =
      std::make_shared<torch::nn::Module>("ExampleLM");
  torchser::OrderedMap<torchser::Placement> placements;

  ExampleLM(int rank, int world) {
    std::vector<Part> parts;
    const auto child = [](torch::nn::Module& parent, const std::string& name) {
      return parent
          .register_module(name, std::make_shared<torch::nn::Module>(name))
          .get();
    };
    torch::nn::Module* embed = child(*root, "embed");
    parts.push_back(
        {embed, "weight", "embed.weight", {kVocab, kHidden}, at::kFloat, 0});
    torch::nn::Module* layers = child(*root, "layers");
    for (int l = 0; l < kLayers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      torch::nn::Module* layer = child(*layers, std::to_string(l));
      torch::nn::Module* attn = child(*layer, "attn");
      torch::nn::Module* qkv = child(*attn, "qkv");
      torch::nn::Module* out = child(*attn, "out");
      torch::nn::Module* mlp = child(*layer, "mlp");
      torch::nn::Module* up = child(*mlp, "up");
      torch::nn::Module* down = child(*mlp, "down");
      torch::nn::Module* norm = child(*layer, "norm");
      parts.push_back(
          {qkv,
           "weight",
           p + "attn.qkv.weight",
           {3 * kHidden, kHidden},
           at::kFloat,
           0});
      parts.push_back(
          {qkv, "bias", p + "attn.qkv.bias", {3 * kHidden}, at::kFloat, 0});
      parts.push_back(
          {out,
           "weight",
           p + "attn.out.weight",
           {kHidden, kHidden},
           at::kFloat,
           1});
      parts.push_back(
          {up,
           "weight",
           p + "mlp.up.weight",
           {kMlp, kHidden},
           at::kBFloat16,
           0});
      parts.push_back(
          {down,
           "weight",
           p + "mlp.down.weight",
           {kHidden, kMlp},
           at::kBFloat16,
           1});
      parts.push_back(
          {norm, "weight", p + "norm.weight", {kHidden}, at::kFloat, -1});
    }
    torch::nn::Module* final_norm = child(*root, "final_norm");
    parts.push_back(
        {final_norm, "weight", "final_norm.weight", {kHidden}, at::kFloat, -1});
    parts.push_back(
        {root.get(),
         "position_ids",
         "position_ids",
         {1, 2048},
         at::kLong,
         -1,
         true});

    for (const Part& part : parts) {
      at::Tensor full =
          part.dtype == at::kLong
              ? at::arange(part.shape[1], at::kLong).unsqueeze(0)
              : full_weight(part.full_name, part.shape, part.dtype);
      at::Tensor local = full;
      if (part.split_dim >= 0) {
        const auto [offset, size] =
            torchser::chunk_range(full.size(part.split_dim), rank, world);
        local = full.narrow(part.split_dim, offset, size).clone();
        placements.insert(
            part.full_name,
            torchser::Placement::shard(
                part.split_dim, full.size(part.split_dim), offset));
      }
      if (part.buffer) {
        part.owner->register_buffer(part.name, local);
      } else {
        part.owner->register_parameter(part.name, local);
      }
    }
    // The output projection is the embedding (tied weights), split alike.
    torch::nn::Module* lm_head = child(*root, "lm_head");
    // (distribute() gives it the embedding's placement.)
    lm_head->register_parameter("weight", embed->named_parameters()["weight"]);
  }
};

int usage() {
  std::cerr
      << "usage: distributed_checkpoint --save DIR [--max-shard-size SIZE] "
         "[--timeout SECONDS]\n"
         "       distributed_checkpoint --load DIR [--timeout SECONDS]\n"
         "  started as WORLD_SIZE processes with torchrun's variables "
         "(run_local.sh N ARGS... starts N on 127.0.0.1)\n";
  return 2;
}

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value == nullptr || *value == '\0' ? fallback : std::atoi(value);
}

// --load: DIR into a zeroed copy of this rank's part, compared with the
// part the model should hold.
int load(const std::filesystem::path& dir, int timeout_s) {
  const int world = env_int("WORLD_SIZE", 1);
  const int rank = env_int("RANK", 0);
  const std::string who =
      "[rank " + std::to_string(rank) + "/" + std::to_string(world) + "] ";
  try {
    const ExampleLM expected(rank, world);
    ExampleLM model(rank, world);
    {
      const c10::AutoGradMode no_grad(false);
      for (const auto& item : torchser::state_dict(*model.root)) {
        item.value().zero_();
      }
    }
    const auto options = torchser::LoadOptions().strict(true);
    std::optional<torchser::ProcessGroup> group;
    if (world > 1) {
      group = torchser::init_process_group_from_env(
          "gloo", std::chrono::seconds(timeout_s));
      group->barrier(); // the clock starts with every rank ready
    }
    const auto t0 = std::chrono::steady_clock::now();
    std::uint64_t bytes_read = 0;
    if (!group) {
      torchser::load_torch_model(*model.root, dir, options);
      // The whole checkpoint: every storage once (the tied head is the
      // embedding).
      std::set<const void*> seen;
      for (const auto& item : torchser::state_dict(*model.root)) {
        if (seen.insert(item.value().data_ptr()).second) {
          bytes_read += item.value().nbytes();
        }
      }
    } else {
      bytes_read = torchser::load_torch_model(
                       *model.root, model.placements, dir, *group, options)
                       .bytes_read;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count();
    const torchser::StateDict want = torchser::state_dict(*expected.root);
    int wrong = 0;
    for (const auto& item : torchser::state_dict(*model.root)) {
      if (!item.value().equal(want[item.key()])) {
        std::cerr << who << item.key() << " differs from the expected values\n";
        ++wrong;
      }
    }
    std::cout << who << "read " << bytes_read << " tensor bytes in " << seconds
              << " s; " << want.size() - wrong << " of " << want.size()
              << " local tensors match\n";
    return wrong == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << who << "load failed: " << e.what() << "\n";
    return 1;
  }
}

} // namespace

int main(int argc, char** argv) {
  std::filesystem::path dir;
  bool loading = false;
  std::string max_shard_size = "5GB";
  int timeout_s = 300;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if ((arg == "--save" || arg == "--load" || arg == "--max-shard-size" ||
         arg == "--timeout") &&
        i + 1 < argc) {
      const std::string value = argv[++i];
      if (arg == "--save" || arg == "--load") {
        if (!dir.empty()) {
          return usage();
        }
        dir = value;
        loading = arg == "--load";
      } else if (arg == "--max-shard-size") {
        max_shard_size = value;
      } else {
        timeout_s = std::atoi(value.c_str());
      }
    } else {
      return usage();
    }
  }
  if (dir.empty()) {
    return usage();
  }
  if (loading) {
    return load(dir, timeout_s);
  }
  const int world = env_int("WORLD_SIZE", 1);
  const int rank = env_int("RANK", 0);
  const std::string who =
      "[rank " + std::to_string(rank) + "/" + std::to_string(world) + "] ";
  try {
    std::filesystem::create_directories(dir);
    const torchser::SaveOptions options =
        torchser::SaveOptions().max_shard_size(max_shard_size);
    if (world == 1) {
      const ExampleLM model(0, 1);
      torchser::save_torch_model(*model.root, dir, options);
      std::cout << who << "saved the whole model with save_torch_model into "
                << dir << "\n";
      return 0;
    }
    const torchser::ProcessGroup group = torchser::init_process_group_from_env(
        "gloo", std::chrono::seconds(timeout_s));
    const ExampleLM model(group.rank(), group.size());
    const auto t0 = std::chrono::steady_clock::now();
    const torchser::DistributedSaveResult result = torchser::save_torch_model(
        *model.root, model.placements, dir, group, options);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
            .count();
    std::cout << who << "wrote " << result.bytes_written
              << " of the checkpoint's " << result.total_bytes
              << " tensor bytes in " << seconds << " s; " << dir << " holds "
              << result.files.size() << " files, committed\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << who << "save failed: " << e.what() << "\n";
    return 1;
  }
}
