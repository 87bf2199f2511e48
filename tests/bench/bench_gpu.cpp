// Loads onto a GPU from a file in memory (tmpfs, else the page cache):
// kDirect's ring of pinned buffers with asynchronous host-to-device copies,
// against the measured pinned host-to-device bandwidth of the same bytes in
// the same run (the physical limit), and the mapped load (pageable copies).
// Runs on tests/device/check.sh's GPU machine; says so and skips elsewhere.
//
// Section "gpu" of torchser_bench (--mib and --repeats resize it).
// Default: 1024 MiB in 256 float32 tensors, 5 repeats, medians.

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/rand.h>
#include <torch/nn/module.h>

#include <torchser/load.h>
#include <torchser/save.h>

#include "bench_utils.h"

using namespace torchser::bench;

namespace {

struct Flat : torch::nn::Module {
  Flat(std::int64_t count, std::int64_t elements) {
    for (std::int64_t i = 0; i < count; ++i) {
      register_parameter("w" + std::to_string(i), at::rand({elements}));
    }
  }
};

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Waits for the current stream's work on `t`'s device: a device-to-host copy
// of one element queues behind it.
void synchronize(const at::Tensor& t) {
  (void)t.reshape(-1).narrow(0, 0, 1).cpu();
}

} // namespace

int torchser::bench::bench_gpu(const Config& config) {
  if (!at::hasCUDA()) {
    std::cout << "(no CUDA in this LibTorch build or no GPU: this section runs "
                 "in tests/device/check.sh on a GPU machine)\n";
    return 0;
  }
  const BenchArgs args = section_args(config, 1024, 256, 5);
  const c10::Device cuda("cuda:0");
  const std::filesystem::path dir =
      std::filesystem::is_directory("/dev/shm")
          ? std::filesystem::path("/dev/shm/torchser-bench-gpu")
          : std::filesystem::path(args.dir) / "gpu";
  std::filesystem::create_directories(dir);
  const std::int64_t elements = args.elements_per_tensor();
  const double total =
      static_cast<double>(elements) * 4 * static_cast<double>(args.tensors);
  auto model = std::make_shared<Flat>(args.tensors, elements);
  torchser::save_torch_model(
      *model, dir, torchser::SaveOptions().max_shard_size("100GB"));
  auto target = std::make_shared<Flat>(args.tensors, elements);
  target->to(cuda);
  std::cout << "# " << args.tensors << " float32 tensors, " << total / (1 << 20)
            << " MiB, file in " << dir << " (in memory), medians of "
            << args.repeats << " runs\n\n";

  // The limit: the same bytes from pinned host memory, one copy.
  const at::Tensor pinned = at::empty(
      {static_cast<std::int64_t>(total)},
      at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  pinned.fill_(1);
  const at::Tensor on_gpu = at::empty(
      {static_cast<std::int64_t>(total)},
      at::TensorOptions().dtype(at::kByte).device(cuda));
  std::vector<double> h2d, direct, mapped, direct_new;
  for (int round = 0; round <= args.repeats; ++round) {
    auto start = Clock::now();
    on_gpu.copy_(pinned, /*non_blocking=*/true);
    synchronize(on_gpu);
    const double t_h2d = seconds_since(start);
    start = Clock::now();
    torchser::load_torch_model(
        *target,
        dir,
        torchser::LoadOptions().strict(true).backend(
            torchser::LoadBackend::kDirect));
    synchronize(target->parameters().back());
    const double t_direct = seconds_since(start);
    start = Clock::now();
    torchser::load_torch_model(
        *target, dir, torchser::LoadOptions().strict(true));
    synchronize(target->parameters().back());
    const double t_mapped = seconds_since(start);
    start = Clock::now();
    const auto sd = torchser::load_state_dict_from_file(
        dir / "model.safetensors",
        torchser::LoadOptions()
            .backend(torchser::LoadBackend::kDirect)
            .map_location(cuda));
    synchronize(sd.begin()->value());
    const double t_new = seconds_since(start);
    if (round > 0) { // the first round warms the allocators
      h2d.push_back(t_h2d);
      direct.push_back(t_direct);
      mapped.push_back(t_mapped);
      direct_new.push_back(t_new);
    }
  }
  const double limit = median_of(h2d);
  print({
      {"pinned host → GPU copy of the same bytes (the limit)",
       limit,
       total,
       "",
       0},
      {"kDirect → GPU module (pinned ring, async copies)",
       median_of(direct),
       total,
       "of pinned H2D",
       limit / median_of(direct)},
      {"kDirect → new GPU tensors (map_location cuda)",
       median_of(direct_new),
       total,
       "of pinned H2D",
       limit / median_of(direct_new)},
      {"kMmap → GPU module (pageable copies)",
       median_of(mapped),
       total,
       "of pinned H2D",
       limit / median_of(mapped)},
  });
  std::filesystem::remove_all(dir);
  return 0;
}
