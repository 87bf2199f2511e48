// Cold loads: a checkpoint whose pages are not in the page cache, loaded
// into new tensors and into a module, against `fio` reading the same file
// sequentially with O_DIRECT in the same run (the device's speed). Before
// every timed run the file's pages are evicted (fsync, then
// posix_fadvise(POSIX_FADV_DONTNEED)), and mincore() checks that they are
// gone.
//
// Rows: fio (O_DIRECT, 16 MiB blocks at queue depth 1 and 8, 256 KiB at 32,
// alone and with
// one core busy, see below; the faster of the round is the limit); torchser's
// kDirect (io_uring, and the pread thread pool), kMmap (then every page
// touched) and kPread, each into new tensors (load_state_dict_from_file) and
// kDirect and kMmap into a module (load_torch_model).
//
// Section "cold" of torchser_bench (--mib, --repeats and --quick resize it).
// Default: 1024 MiB in 256 float32 tensors, 3 repeats, medians.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <ATen/ops/rand.h>
#include <torch/nn/module.h>
#include <nlohmann/json.hpp>

#include <torchser/load.h>
#include <torchser/save.h>

#include "bench_utils.h"
#include "torchser/detail/direct_io.h"

using namespace torchser::bench;

namespace {

struct Flat : torch::nn::Module {
  Flat(std::int64_t count, std::int64_t elements) {
    for (std::int64_t i = 0; i < count; ++i) {
      register_parameter("w" + std::to_string(i), at::rand({elements}));
    }
  }
};

// Drops the file's pages from the page cache; returns the fraction still
// resident afterwards (mincore over a fresh mapping).
double evict(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    return 1;
  }
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  struct stat st {};
  ::fstat(fd, &st);
  const auto size = static_cast<std::size_t>(st.st_size);
  double resident = 0;
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (map != MAP_FAILED) {
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> in((size + page - 1) / page);
    if (::mincore(map, size, in.data()) == 0) {
      std::size_t n = 0;
      for (const unsigned char c : in) {
        n += c & 1;
      }
      resident = in.empty() ? 0 : static_cast<double>(n) / in.size();
    }
    ::munmap(map, size);
  }
  ::close(fd);
  return resident;
}

// fio's read bandwidth (bytes/s) of one sequential O_DIRECT pass over
// `path`; 0 when fio is missing or fails.
double fio_bandwidth(
    const std::filesystem::path& path,
    const std::string& block,
    int depth,
    const std::string& engine) {
  const std::string command = "fio --name=cold --readonly --filename='" +
                              path.string() + "' --rw=read --bs=" + block +
                              " --direct=1 --ioengine=" + engine +
                              " --iodepth=" + std::to_string(depth) +
                              " --output-format=json 2>/dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) {
    return 0;
  }
  std::string out;
  std::array<char, 4096> buffer{};
  std::size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0) {
    out.append(buffer.data(), n);
  }
  if (::pclose(pipe) != 0) {
    return 0;
  }
  try {
    // fio may print notes before its JSON.
    const auto json = nlohmann::json::parse(out.substr(out.find('{')));
    return json.at("jobs").at(0).at("read").at("bw_bytes").get<double>();
  } catch (const std::exception&) {
    return 0;
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

} // namespace

int torchser::bench::bench_cold(const Config& config) {
  const BenchArgs args = section_args(config, 1024, 256, 3);
  const std::filesystem::path dir = std::filesystem::path(args.dir) / "cold";
  std::filesystem::create_directories(dir);
  const std::int64_t elements = args.elements_per_tensor();
  const double total =
      static_cast<double>(elements) * 4 * static_cast<double>(args.tensors);
  auto model = std::make_shared<Flat>(args.tensors, elements);
  auto target = std::make_shared<Flat>(args.tensors, elements);
  // One file: fio and every loader read exactly the same bytes.
  torchser::save_torch_model(
      *model, dir, torchser::SaveOptions().max_shard_size("100GB"));
  const std::filesystem::path file = dir / "model.safetensors";
  const torchser::detail::DirectFile probe(file, file.string());
  const bool have_fio = fio_bandwidth(file, "16M", 1, "psync") > 0;
  std::cout << "# " << args.tensors << " float32 tensors, " << total / (1 << 20)
            << " MiB in one safetensors file, evicted from the page cache "
               "before every run, medians of "
            << args.repeats << " runs, file in " << dir << "; O_DIRECT "
            << (probe.direct() ? "on" : "refused by this filesystem")
            << ", engine " << torchser::detail::io_engine_name(probe.engine())
            << "\n\n";
  if (!have_fio) {
    std::cout << "(fio is not installed: `apt-get install fio` adds the "
                 "device-speed rows)\n\n";
  }

  using Run = std::function<void()>;
  const auto touch = [](const torchser::StateDict& sd) {
    // One byte a page: a mapping's pages come in by faults.
    volatile std::uint8_t sink = 0;
    for (const auto& item : sd) {
      const auto* p = static_cast<const std::uint8_t*>(item.value().data_ptr());
      const auto n = static_cast<std::size_t>(item.value().nbytes());
      for (std::size_t i = 0; i < n; i += 4096) {
        sink = sink + p[i];
      }
    }
  };
  const auto from_file = [&](torchser::LoadBackend backend) -> Run {
    return [&, backend] {
      const auto sd = torchser::load_state_dict_from_file(
          file, torchser::LoadOptions().backend(backend));
      if (backend == torchser::LoadBackend::kMmap) {
        touch(sd);
      }
    };
  };
  const auto into_module = [&](torchser::LoadBackend backend) -> Run {
    return [&, backend] {
      torchser::load_torch_model(
          *target, dir, torchser::LoadOptions().strict(true).backend(backend));
    };
  };
  const auto with_threads = [](Run run) -> Run {
    return [run] {
      ::setenv("TORCHSER_IO_ENGINE", "threads", 1);
      run();
      ::unsetenv("TORCHSER_IO_ENGINE");
    };
  };
  struct Subject {
    std::string what;
    Run run;
    std::vector<double> seconds;
  };
  std::vector<Subject> subjects = {
      {"kDirect → new tensors (load_state_dict_from_file)",
       from_file(torchser::LoadBackend::kDirect),
       {}},
      {"kDirect → module (load_torch_model)",
       into_module(torchser::LoadBackend::kDirect),
       {}},
      {"kDirect, pread thread pool → new tensors",
       with_threads(from_file(torchser::LoadBackend::kDirect)),
       {}},
      {"kDirect, pread thread pool → module",
       with_threads(into_module(torchser::LoadBackend::kDirect)),
       {}},
      {"kMmap → new tensors, every page touched",
       from_file(torchser::LoadBackend::kMmap),
       {}},
      {"kMmap → module", into_module(torchser::LoadBackend::kMmap), {}},
      {"kPread → new tensors", from_file(torchser::LoadBackend::kPread), {}},
  };
  std::map<std::string, std::vector<double>> fio;
  std::vector<double> best_fio_round; // the faster fio of each round
  double worst_resident = 0;
  for (int round = 0; round < args.repeats; ++round) {
    double best = 0;
    if (have_fio) {
      // Large blocks (as the loaders read), and the small blocks with a deep
      // queue that this VM's virtio disk serves fastest.
      for (const auto& [block, depth, engine] :
           std::vector<std::tuple<std::string, int, std::string>>{
               {"16M", 1, "psync"},
               {"16M", 8, "io_uring"},
               {"256k", 32, "io_uring"}}) {
        for (const bool busy : {false, true}) {
          // On this project's VMs the disk serves a guest whose vCPUs are
          // idle (halted) up to 2x slower than one with a busy core, and a
          // loader keeps a core busy: fio is measured both ways and the
          // faster counts.
          std::atomic<bool> stop{false};
          std::thread spinner;
          if (busy) {
            spinner = std::thread([&] {
              while (!stop.load(std::memory_order_relaxed)) {
              }
            });
          }
          worst_resident = std::max(worst_resident, evict(file));
          const double bw = fio_bandwidth(file, block, depth, engine);
          stop = true;
          if (spinner.joinable()) {
            spinner.join();
          }
          if (bw > 0) {
            fio["fio, O_DIRECT, " + block + " blocks, " + engine + " depth " +
                std::to_string(depth) + (busy ? ", one core busy" : "")]
                .push_back(total / bw);
            best = best == 0 ? total / bw : std::min(best, total / bw);
          }
        }
      }
    }
    best_fio_round.push_back(best);
    for (Subject& s : subjects) {
      worst_resident = std::max(worst_resident, evict(file));
      const auto start = Clock::now();
      s.run();
      s.seconds.push_back(seconds_since(start));
    }
  }
  // Each ratio is the median of the rounds' ratios to that round's faster
  // fio: the disk's speed drifts between rounds.
  std::vector<Row> rows;
  for (const auto& [name, times] : fio) {
    rows.push_back({name, median(times), total, "", 0});
  }
  for (const Subject& s : subjects) {
    std::vector<double> ratios;
    for (std::size_t r = 0; r < s.seconds.size(); ++r) {
      if (best_fio_round[r] > 0) {
        ratios.push_back(best_fio_round[r] / s.seconds[r]);
      }
    }
    rows.push_back(
        {s.what,
         median(s.seconds),
         total,
         ratios.empty() ? "" : "the round's faster fio",
         median(ratios)});
  }
  print(rows);
  std::cout << "\nAt most " << worst_resident * 100
            << "% of the file's pages were resident when a run started.\n";
  std::filesystem::remove_all(dir);
  return 0;
}
