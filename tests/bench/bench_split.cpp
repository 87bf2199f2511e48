// Shard planning throughput: split_torch_state_dict_into_shards on state
// dicts of 1k … 1M tensors, against huggingface_hub's planner run by
// /usr/bin/python3 on the same workload in the same run (when importable).
//
// Workload: N float32 tensors of 16 elements; every 10th entry is a view
// (base[1:]) of the entry before it, so storage grouping is exercised;
// max_shard_size = 100 tensors' worth (6400 bytes), so there are ~N/100
// shards (the reference's cost grows with storages × shards).
//
// Section "split" of torchser_bench: 1k tensors up to --max-tensors (1M);
// the Python planner up to --python-max-tensors (10k; 1k in quick mode).

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ops/zeros.h>

#include <torchser/split.h>

#include "bench_utils.h"

namespace {

using torchser::bench::Clock;

torchser::StateDict make_state_dict(std::int64_t n) {
  torchser::StateDict sd;
  sd.reserve(static_cast<std::size_t>(n));
  at::Tensor previous;
  for (std::int64_t i = 0; i < n; ++i) {
    at::Tensor t = (i % 10 == 9) ? previous.slice(0, 1) : at::zeros({16});
    sd.insert(
        "model.layers." + std::to_string(i / 10) + ".w" +
            std::to_string(i % 10),
        t);
    previous = t;
  }
  return sd;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double time_torchser(const torchser::StateDict& sd, int repeats) {
  std::vector<double> seconds;
  for (int r = 0; r < repeats; ++r) {
    const auto start = Clock::now();
    const auto split = torchser::split_torch_state_dict_into_shards(
        sd, torchser::SplitOptions().max_shard_size(6400));
    seconds.push_back(
        std::chrono::duration<double>(Clock::now() - start).count());
    if (split.tensor_to_filename.size() != sd.size()) {
      std::cerr << "bench: plan lost tensors\n";
      std::exit(1);
    }
  }
  return median(seconds);
}

// Seconds the reference planner takes for n tensors, or a negative value when
// /usr/bin/python3 cannot import huggingface_hub.
double time_python(std::int64_t n, int repeats) {
  if (!torchser::bench::python_enabled()) {
    return -1;
  }
  const std::string script =
      "import sys,time,statistics\n"
      "try:\n"
      " import torch\n"
      " from huggingface_hub.serialization._torch import "
      "split_torch_state_dict_into_shards\n"
      "except Exception:\n"
      " print(-1); sys.exit(0)\n"
      "n=" +
      std::to_string(n) +
      "\n"
      "sd={}\nprev=None\n"
      "for i in range(n):\n"
      " t=prev[1:] if i%10==9 else torch.zeros(16)\n"
      " sd[f'model.layers.{i//10}.w{i%10}']=t; prev=t\n"
      "ts=[]\n"
      "for _ in range(" +
      std::to_string(repeats) +
      "):\n"
      " s=time.perf_counter(); split_torch_state_dict_into_shards(sd, "
      "max_shard_size=6400); ts.append(time.perf_counter()-s)\n"
      "print(statistics.median(ts))\n";
  const std::string command =
      "/usr/bin/python3 - 2>/dev/null <<'TORCHSER_EOF'\n" + script +
      "TORCHSER_EOF\n";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) {
    return -1;
  }
  char buffer[128] = {0};
  const bool got = std::fgets(buffer, sizeof buffer, pipe) != nullptr;
  ::pclose(pipe);
  return got ? std::atof(buffer) : -1;
}

std::string ms(double seconds) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.2f ms", seconds * 1e3);
  return buffer;
}

} // namespace

int torchser::bench::bench_split(const Config& config) {
  const std::int64_t max_tensors =
      config.quick ? std::min<std::int64_t>(config.max_tensors, 10'000)
                   : config.max_tensors;
  const std::int64_t python_max =
      config.quick ? std::min<std::int64_t>(config.python_max_tensors, 1'000)
                   : config.python_max_tensors;
  std::cout << "| tensors | shards | torchser | per tensor | huggingface_hub "
               "(Python) | speed-up |\n"
            << "|---:|---:|---:|---:|---:|---:|\n";
  for (std::int64_t n = 1000; n <= max_tensors; n *= 10) {
    const auto sd = make_state_dict(n);
    const int repeats = config.repeats > 0 ? config.repeats
                        : config.quick     ? 1
                                           : (n >= 1'000'000 ? 3 : 7);
    const double ours = time_torchser(sd, repeats);
    const auto shards = torchser::split_torch_state_dict_into_shards(
                            sd, torchser::SplitOptions().max_shard_size(6400))
                            .filename_to_tensors.size();
    std::string python = "not run";
    std::string ratio = "";
    if (n <= python_max) {
      const double theirs =
          time_python(n, config.quick || n >= 100'000 ? 1 : 3);
      if (theirs >= 0) {
        python = ms(theirs);
        char buffer[32];
        std::snprintf(buffer, sizeof buffer, "%.0f×", theirs / ours);
        ratio = buffer;
      } else {
        python = "unavailable";
      }
    }
    char per[32];
    std::snprintf(
        per, sizeof per, "%.0f ns", ours * 1e9 / static_cast<double>(n));
    std::cout << "| " << n << " | " << shards << " | " << ms(ours) << " | "
              << per << " | " << python << " | " << ratio << " |" << std::endl;
  }
  return 0;
}
