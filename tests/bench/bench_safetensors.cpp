// safetensors save and load against the machine's limits and the peers, all
// measured in one run on the same data:
//   - physical limits: memcpy, raw write() of the same bytes (to page cache,
//     and with fsync), read() of the file;
//   - torchser: save_file (durable and not), load_file with mmap (zero-copy:
//     open + create every tensor, then touch every byte), with pread (copy);
//   - torch::save / torch::load (C++), and Python torch.save / torch.load via
//     /usr/bin/python3 when it has torch.
//
// Section "safetensors" of torchser_bench (--mib, --repeats and --quick resize
// it). Default: 1024 MiB in 1024 float32 tensors, 5 repeats, medians.

#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <torch/serialize.h>

#include <torchser/safetensors.h>

#include "bench_utils.h"

using namespace torchser::bench;

int torchser::bench::bench_safetensors(const Config& config) {
  const BenchArgs args = section_args(config, 1024, 1024, 5);
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
  std::vector<Row> rows;

  // --- physical limits and the paired comparisons ---------------------------
  const auto raw_path = dir / "raw.bin";
  std::vector<char> destination(static_cast<std::size_t>(total));
  std::memset(destination.data(), 1, destination.size()); // pre-fault
  const auto memcpy_touched = [&] {
    std::size_t offset = 0;
    for (const auto& t : tensors) {
      std::memcpy(destination.data() + offset, t.data_ptr(), t.nbytes());
      offset += t.nbytes();
    }
  };
  const auto memcpy_fresh = [&] { memcpy_into_new(tensors); };
  const auto raw_write = [&](bool durable) {
    write_raw(raw_path, tensors, durable);
  };
  const auto st_path = dir / "model.safetensors";
  const auto pt_path = dir / "model.pt";
  // Every write goes to a new file: replacing a 1 GiB file first frees the
  // old one's pages and blocks (hundreds of ms here, whoever writes), which
  // would only add the same constant to both sides.
  const auto settle = [&] {
    std::filesystem::remove(raw_path);
    std::filesystem::remove(st_path);
    std::filesystem::remove(pt_path);
    ::sync();
  };
  // Loaders that return new tensors pay for new pages (zeroed by the kernel
  // on first touch: a large part of the cost on this VM). Returning freed
  // heap memory to the system before each run makes every copying loader,
  // and the memcpy baseline, start from the same state: the first load of a
  // model in a process.
  const auto fresh_memory = [] { ::malloc_trim(0); };
  const torchser::SafetensorsMetadata metadata{{"format", "pt"}};

  const Paired save_fast = paired(
      repeats,
      [&] { raw_write(false); },
      [&] {
        torchser::save_file(
            sd, st_path, metadata, torchser::SaveFileOptions().durable(false));
      },
      settle);
  const Paired save_durable = paired(
      repeats,
      [&] { raw_write(true); },
      [&] { torchser::save_file(sd, st_path, metadata); },
      settle);
  const Paired torch_save = paired(
      repeats,
      [&] { raw_write(false); },
      [&] { torch::save(tensors, pt_path.string()); },
      settle);

  torchser::save_file(sd, st_path, metadata); // the file the loads read
  torch::save(tensors, pt_path.string());
  const double t_read = median_seconds(repeats, [&] {
    const int fd = ::open(st_path.c_str(), O_RDONLY);
    std::size_t done = 0;
    while (done < destination.size()) {
      const ssize_t n = ::read(
          fd,
          destination.data() + done,
          std::min<std::size_t>(destination.size() - done, 1 << 30));
      if (n <= 0) {
        break;
      }
      done += static_cast<std::size_t>(n);
    }
    ::close(fd);
  });

  std::int64_t rss_growth = 0;
  const double t_open = median_seconds(repeats, [&] {
    const auto before = rss_bytes();
    const auto loaded = torchser::load_file(st_path);
    rss_growth = rss_bytes() - before;
    if (loaded.size() != sd.size()) {
      std::exit(1);
    }
  });
  double checksum = 0;
  const double t_touch = median_seconds(repeats, [&] {
    const auto loaded = torchser::load_file(st_path);
    for (const auto& item : loaded) {
      const float* p = item.value().data_ptr<float>();
      for (std::int64_t k = 0; k < item.value().numel();
           k += 1024) { // one float per page
        checksum += p[k];
      }
    }
  });
  const Paired mmap_copy = paired(repeats, memcpy_touched, [&] {
    const auto loaded = torchser::load_file(st_path);
    std::size_t offset = 0;
    for (const auto& item : loaded) {
      std::memcpy(
          destination.data() + offset,
          item.value().data_ptr(),
          item.value().nbytes());
      offset += item.value().nbytes();
    }
  });
  const Paired pread_load = paired(
      repeats,
      memcpy_fresh,
      [&] {
        const auto loaded = torchser::load_file(
            st_path,
            torchser::SafeOpenOptions().backend(torchser::LoadBackend::kPread));
        if (loaded.size() != sd.size()) {
          std::exit(1);
        }
      },
      fresh_memory);
  const Paired torch_load = paired(
      repeats,
      memcpy_fresh,
      [&] {
        std::vector<at::Tensor> loaded;
        torch::load(loaded, pt_path.string());
      },
      fresh_memory);

  rows.push_back(
      {"memcpy into touched memory (one thread)",
       mmap_copy.baseline,
       total,
       "",
       0});
  rows.push_back(
      {"memcpy into new allocations, one per tensor (new pages)",
       pread_load.baseline,
       total,
       "",
       0});
  rows.push_back(
      {"raw write() to page cache (new file)",
       save_fast.baseline,
       total,
       "",
       0});
  rows.push_back(
      {"raw write() + fsync (new file)", save_durable.baseline, total, "", 0});
  rows.push_back({"raw read() of the file, warm", t_read, total, "", 0});
  rows.push_back(
      {"torchser save_file (durable=false)",
       save_fast.subject,
       total,
       "of raw write()",
       save_fast.ratio});
  rows.push_back(
      {"torchser save_file (durable, the default)",
       save_durable.subject,
       total,
       "of raw write() + fsync",
       save_durable.ratio});
  rows.push_back(
      {"torch::save (C++)",
       torch_save.subject,
       total,
       "of raw write()",
       torch_save.ratio});
  rows.push_back(
      {"torchser load_file, mmap: open + create every tensor",
       t_open,
       0,
       "",
       0});
  rows.push_back(
      {"torchser load_file, mmap, then touch every page",
       t_touch,
       total,
       "",
       0});
  rows.push_back(
      {"torchser load_file, mmap, copied into touched memory",
       mmap_copy.subject,
       total,
       "of memcpy",
       mmap_copy.ratio});
  rows.push_back(
      {"torchser load_file, pread (new tensors)",
       pread_load.subject,
       total,
       "of memcpy into new allocations",
       pread_load.ratio});
  rows.push_back(
      {"torch::load (C++)",
       torch_load.subject,
       total,
       "of memcpy into new allocations",
       torch_load.ratio});

  // --- Python torch
  // ------------------------------------------------------------
  const auto py_path = dir / "model.bin";
  const std::string script =
      "import sys,time,statistics\n"
      "try:\n import torch\nexcept Exception:\n print('-1 -1'); sys.exit(0)\n"
      "sd={f'model.layers.{i}.weight': torch.rand(" +
      std::to_string(per_tensor) + ") for i in range(" + std::to_string(count) +
      ")}\n"
      "import os\n"
      "p='" +
      py_path.string() +
      "'\n"
      "s=[];l=[]\n"
      "for _ in range(" +
      std::to_string(repeats) +
      "):\n"
      " os.path.exists(p) and os.remove(p); os.sync()\n"
      " t=time.perf_counter(); torch.save(sd, p); "
      "s.append(time.perf_counter()-t)\n"
      " t=time.perf_counter(); torch.load(p); l.append(time.perf_counter()-t)\n"
      "print(statistics.median(s), statistics.median(l))\n";
  const auto python = python_numbers(script);
  if (python.size() == 2 && python[0] > 0) {
    rows.push_back(
        {"Python torch.save (/usr/bin/python3)",
         python[0],
         total,
         "of raw write()",
         save_fast.baseline / python[0]});
    rows.push_back(
        {"Python torch.load (/usr/bin/python3)",
         python[1],
         total,
         "of memcpy into new allocations",
         pread_load.baseline / python[1]});
  } else {
    std::cout << "(Python torch not available: skipped)\n";
  }

  print(rows);
  std::cout << "\nmmap open + create " << count << " tensors: " << t_open * 1e3
            << " ms, resident memory growth " << rss_growth / 1024
            << " KiB (checksum " << checksum << ")\n"
            << "torchser save_file (durable=false) vs torch::save: "
            << torch_save.subject / save_fast.subject
            << "× faster; load_file (pread) vs torch::load: "
            << torch_load.subject / pread_load.subject
            << "× faster; load_file (mmap, open + create) vs torch::load: "
            << torch_load.subject / t_open << "× faster\n";
  std::filesystem::remove(raw_path);
  std::filesystem::remove(st_path);
  std::filesystem::remove(pt_path);
  std::filesystem::remove(py_path);
  return 0;
}
