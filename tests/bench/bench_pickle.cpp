// torch.save-format (pickle .bin) save and load against the limits and the
// peers, in one run on the same data: raw write(), memcpy into new
// allocations, torch::pickle_load (LibTorch's unpickler, whole file in
// memory), and Python torch.save / torch.load via /usr/bin/python3.
//
// Section "pickle" of torchser_bench (--mib, --repeats and --quick resize it).
// Default: 1024 MiB in 256 float32 tensors, 5 repeats, medians.

#include <malloc.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include <torch/csrc/jit/serialization/pickle.h>

#include <torchser/pickle.h>

#include "bench_utils.h"

using namespace torchser::bench;

int torchser::bench::bench_pickle(const Config& config) {
  const BenchArgs args = section_args(config, 1024, 256, 5);
  const std::filesystem::path dir = args.dir;
  const std::int64_t count = args.tensors;
  const int repeats = args.repeats;
  const std::int64_t per_tensor = args.elements_per_tensor();
  // (References, not a structured binding: C++17 lambdas cannot capture those.)
  const Workload work = random_workload(count, per_tensor);
  const torchser::StateDict& sd = work.sd;
  const std::vector<at::Tensor>& tensors = work.tensors;
  const double total = work.total;
  std::cout << "# " << count << " float32 tensors, " << total / (1 << 20)
            << " MiB, medians of " << repeats << " runs, files in " << dir
            << "\n\n";

  const auto raw_path = dir / "raw.bin";
  const auto bin_path = dir / "pytorch_model.bin";
  const auto settle = [&] {
    std::filesystem::remove(raw_path);
    std::filesystem::remove(bin_path);
    ::sync();
  };
  const auto fresh_memory = [] { ::malloc_trim(0); };
  const auto raw_write = [&] {
    write_raw(raw_path, tensors, /*durable=*/false);
  };
  const auto memcpy_fresh = [&] { memcpy_into_new(tensors); };

  const Paired save = paired(
      repeats,
      raw_write,
      [&] { torchser::torch_save(sd, bin_path, /*durable=*/false); },
      settle);
  torchser::torch_save(sd, bin_path, /*durable=*/false);

  std::int64_t rss_growth = 0;
  const double t_open = median_seconds(repeats, [&] {
    const auto before = rss_bytes();
    const auto loaded =
        torchser::extract_state_dict(torchser::torch_load(bin_path));
    rss_growth = rss_bytes() - before;
    if (loaded.size() != sd.size()) {
      std::exit(1);
    }
  });
  const Paired copy_load = paired(
      repeats,
      memcpy_fresh,
      [&] {
        const auto loaded = torchser::torch_load(
            bin_path, torchser::TorchLoadOptions().mmap(false));
      },
      fresh_memory);
  const double t_pickle_load = median_seconds(
      repeats,
      [&] {
        std::vector<char> bytes(std::filesystem::file_size(bin_path));
        std::ifstream(bin_path, std::ios::binary)
            .read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        const auto value = torch::jit::pickle_load(bytes);
        if (!value.isGenericDict()) {
          std::exit(1);
        }
      },
      fresh_memory);

  std::vector<Row> rows = {
      {"memcpy into new allocations (new pages)",
       copy_load.baseline,
       total,
       "",
       0},
      {"raw write() to page cache (new file)", save.baseline, total, "", 0},
      {"torchser torch_save (durable=false)",
       save.subject,
       total,
       "of raw write()",
       save.ratio},
      {"torchser torch_load, mmap: open + create every tensor",
       t_open,
       0,
       "",
       0},
      {"torchser torch_load, one copy per storage",
       copy_load.subject,
       total,
       "of memcpy into new allocations",
       copy_load.ratio},
      {"torch::pickle_load (reads the whole file first)",
       t_pickle_load,
       total,
       "of memcpy into new allocations",
       copy_load.baseline / t_pickle_load},
  };

  // Python: one process saves (timed per call); each load runs in a process
  // of its own, so that it too starts from new memory, as the first load of
  // a checkpoint does.
  const auto py_path = dir / "python.bin";
  const std::string save_script =
      "import os,sys,time,statistics\n"
      "try:\n import torch\nexcept Exception:\n print(-1); sys.exit(0)\n"
      "sd={f'model.layers.{i}.weight': torch.rand(" +
      std::to_string(per_tensor) + ") for i in range(" + std::to_string(count) +
      ")}\n"
      "p='" +
      py_path.string() +
      "'\n"
      "s=[]\n"
      "for _ in range(" +
      std::to_string(repeats) +
      "):\n"
      " os.path.exists(p) and os.remove(p); os.sync()\n"
      " t=time.perf_counter(); torch.save(sd, p); "
      "s.append(time.perf_counter()-t)\n"
      "print(statistics.median(s))\n";
  const std::string load_script =
      "import time,torch\n"
      "t=time.perf_counter(); torch.load('" +
      py_path.string() + "'); print(time.perf_counter()-t)\n";
  const auto run_python = [](const std::string& script) {
    const auto numbers = python_numbers(script);
    return numbers.empty() ? -1.0 : numbers.front();
  };
  const double py_save = run_python(save_script);
  double py_load = -1;
  if (py_save > 0) {
    std::vector<double> loads;
    for (int r = 0; r < repeats; ++r) {
      loads.push_back(run_python(load_script));
    }
    std::sort(loads.begin(), loads.end());
    py_load = loads[loads.size() / 2];
    std::filesystem::remove(py_path);
  }
  if (py_save > 0) {
    rows.push_back(
        {"Python torch.save (/usr/bin/python3)",
         py_save,
         total,
         "of raw write()",
         save.baseline / py_save});
    rows.push_back(
        {"Python torch.load (/usr/bin/python3)",
         py_load,
         total,
         "of memcpy into new allocations",
         copy_load.baseline / py_load});
  }
  print(rows);
  std::cout << "\nmmap open + create " << count << " tensors: " << t_open * 1e3
            << " ms, resident memory growth " << rss_growth / 1024 << " KiB\n";
  if (py_save > 0) {
    std::cout << "torch_save vs Python torch.save: " << py_save / save.subject
              << "× faster; "
              << "torch_load (copy) vs Python torch.load: "
              << py_load / copy_load.subject << "× faster; "
              << "vs torch::pickle_load: " << t_pickle_load / copy_load.subject
              << "× faster\n";
  }
  settle();
  return 0;
}
