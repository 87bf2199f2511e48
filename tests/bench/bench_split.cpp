// Shard planning throughput: split_torch_state_dict_into_shards on state
// dicts of 1k … 1M tensors, against huggingface_hub's planner run by
// /usr/bin/python3 on the same workload in the same run (when importable).
//
// Workload: N float32 tensors of 16 elements; every 10th entry is a view
// (base[1:]) of the entry before it, so storage grouping is exercised;
// max_shard_size = 100 tensors' worth (6400 bytes), so there are ~N/100
// shards (the reference's cost grows with storages × shards).
//
// Usage: torchser_bench_split [--max-tensors N] [--python-max-tensors N]
//                             [--markdown]

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

namespace {

using Clock = std::chrono::steady_clock;

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

int main(int argc, char** argv) {
  std::int64_t max_tensors = 1'000'000;
  std::int64_t python_max = 10'000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--max-tensors") {
      max_tensors = std::atoll(argv[i + 1]);
    } else if (arg == "--python-max-tensors") {
      python_max = std::atoll(argv[i + 1]);
    }
  }
  std::cout << "| tensors | shards | torchser | per tensor | huggingface_hub "
               "(Python) | speed-up |\n"
            << "|---:|---:|---:|---:|---:|---:|\n";
  for (std::int64_t n = 1000; n <= max_tensors; n *= 10) {
    const auto sd = make_state_dict(n);
    const int repeats = std::getenv("BENCH_REPEATS")
                            ? std::atoi(std::getenv("BENCH_REPEATS"))
                            : (n >= 1'000'000 ? 3 : 7);
    const double ours = time_torchser(sd, repeats);
    const auto shards = torchser::split_torch_state_dict_into_shards(
                            sd, torchser::SplitOptions().max_shard_size(6400))
                            .filename_to_tensors.size();
    std::string python = "not run";
    std::string ratio = "";
    if (n <= python_max) {
      const double theirs = time_python(n, n >= 100'000 ? 1 : 3);
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
