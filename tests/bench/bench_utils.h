#pragma once

// Timing, memory and table helpers shared by the benchmark programs.

#include <fcntl.h>
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

#include <ATen/ops/empty_like.h>
#include <ATen/ops/rand.h>

#include <torchser/state_dict.h>

namespace torchser::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline double median_seconds(
    int repeats,
    const std::function<void()>& body,
    const std::function<void()>& before = {}) {
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    if (before) {
      before();
    }
    const auto start = Clock::now();
    body();
    times.push_back(seconds_since(start));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Runs `baseline` and `subject` alternately `repeats` times (after one
// untimed round of each, so allocator and page-cache state are steady), with
// `before` ahead of every run. Returns the medians of both times and of the
// per-round ratio baseline/subject, which cancels the drift of a noisy
// machine (writeback bursts, neighbours) that separate medians keep.
struct Paired {
  double baseline;
  double subject;
  double ratio;
};
inline Paired paired(
    int repeats,
    const std::function<void()>& baseline,
    const std::function<void()>& subject,
    const std::function<void()>& before = {}) {
  std::vector<double> a;
  std::vector<double> b;
  std::vector<double> ratio;
  for (int r = -1; r < repeats; ++r) {
    if (before) {
      before();
    }
    auto start = Clock::now();
    baseline();
    const double ta = seconds_since(start);
    if (before) {
      before();
    }
    start = Clock::now();
    subject();
    const double tb = seconds_since(start);
    if (r >= 0) {
      a.push_back(ta);
      b.push_back(tb);
      ratio.push_back(ta / tb);
    }
  }
  for (auto* v : {&a, &b, &ratio}) {
    std::sort(v->begin(), v->end());
  }
  return {a[a.size() / 2], b[b.size() / 2], ratio[ratio.size() / 2]};
}

// Resident set size of this process, in bytes.
inline std::int64_t rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::int64_t pages = 0;
  std::int64_t resident = 0;
  statm >> pages >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

inline void write_all(int fd, const void* data, std::size_t size) {
  const auto* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, std::min<std::size_t>(size, 1 << 30));
    if (n <= 0) {
      std::perror("write");
      std::exit(1);
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
}

// The physical limit of every save: the tensors' bytes written one after
// another to a new file with plain write() (then fsync when `durable`).
inline void write_raw(
    const std::filesystem::path& path,
    const std::vector<at::Tensor>& tensors,
    bool durable) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  for (const auto& t : tensors) {
    write_all(fd, t.data_ptr(), t.nbytes());
  }
  if (durable) {
    ::fsync(fd);
  }
  ::close(fd);
}

// What a copying loader must do at least: a new allocation per tensor,
// filled with memcpy.
inline void memcpy_into_new(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> copies;
  for (const auto& t : tensors) {
    copies.push_back(at::empty_like(t));
    std::memcpy(copies.back().data_ptr(), t.data_ptr(), t.nbytes());
  }
}

// `count` random float32 tensors of `per_tensor` elements, as a state dict
// ("model.layers.<i>.weight") and as a list, and their bytes in all.
struct Workload {
  torchser::StateDict sd;
  std::vector<at::Tensor> tensors;
  double total;
};
inline Workload random_workload(std::int64_t count, std::int64_t per_tensor) {
  Workload w;
  for (std::int64_t i = 0; i < count; ++i) {
    auto t = at::rand({per_tensor});
    w.sd.insert("model.layers." + std::to_string(i) + ".weight", t);
    w.tensors.push_back(t);
  }
  w.total = static_cast<double>(per_tensor) * 4 * static_cast<double>(count);
  return w;
}

struct Row {
  std::string what;
  double seconds;
  double bytes;
  std::string versus; // what the ratio compares with
  double ratio; // baseline time / this time (> 1: faster than the baseline)
};

inline void print(const std::vector<Row>& rows) {
  std::cout << "| operation | time | GB/s | ratio |\n|---|---:|---:|---:|\n";
  for (const Row& r : rows) {
    char line[256];
    char gbps[32] = "";
    if (r.bytes > 0) { // rows that move no bytes (opening, reading a directory)
                       // have no rate
      std::snprintf(gbps, sizeof gbps, "%.2f", r.bytes / r.seconds / 1e9);
    }
    if (r.ratio > 0) {
      std::snprintf(
          line,
          sizeof line,
          "| %s | %.1f ms | %s | %.2f× %s |",
          r.what.c_str(),
          r.seconds * 1e3,
          gbps,
          r.ratio,
          r.versus.c_str());
    } else {
      std::snprintf(
          line,
          sizeof line,
          "| %s | %.1f ms | %s | |",
          r.what.c_str(),
          r.seconds * 1e3,
          gbps);
    }
    std::cout << line << "\n";
  }
}

/// What the one benchmark program was asked for (see bench_main.cpp).
struct Config {
  std::string dir;                      ///< where the files go
  bool quick = false;                   ///< CI mode: small sizes, one repeat
  std::int64_t mib = 0;                 ///< 0: each section's default
  int repeats = 0;                      ///< 0: each section's default
  std::int64_t max_tensors = 1'000'000; ///< largest planner workload
  std::int64_t python_max_tensors = 10'000; ///< largest one Python plans too
};

/// Whether the Python peers run (off with --no-python).
inline bool& python_enabled() {
  static bool enabled = true;
  return enabled;
}

/// Runs a Python script on /usr/bin/python3 and returns the numbers it
/// prints (empty when Python or its torch is missing, or Python is off).
inline std::vector<double> python_numbers(const std::string& script) {
  std::vector<double> numbers;
  if (!python_enabled()) {
    return numbers;
  }
  if (FILE* pipe = ::popen(
          ("/usr/bin/python3 - 2>/dev/null <<'TORCHSER_EOF'\n" + script +
           "TORCHSER_EOF\n")
              .c_str(),
          "r")) {
    double value = 0;
    while (std::fscanf(pipe, "%lf", &value) == 1) {
      numbers.push_back(value);
    }
    ::pclose(pipe);
  }
  return numbers;
}

/// Sizes of one I/O section: `mib` MiB in `tensors` float32 tensors,
/// `repeats` paired rounds.
struct BenchArgs {
  std::string dir;
  std::int64_t mib;
  std::int64_t tensors;
  int repeats;
  /// float32 elements per tensor for `mib` MiB in `tensors` tensors.
  std::int64_t elements_per_tensor() const {
    return std::max<std::int64_t>(1, mib * (1 << 20) / tensors / 4);
  }
};
/// A section's defaults (`mib`, `tensors`, `repeats`) with the command
/// line's overrides; quick mode shrinks them to seconds in all.
inline BenchArgs section_args(
    const Config& config, std::int64_t mib, std::int64_t tensors, int repeats) {
  BenchArgs args{config.dir, mib, tensors, repeats};
  if (config.quick) {
    args.mib = 16;
    args.repeats = 1;
  }
  if (config.mib > 0) {
    args.mib = config.mib;
  }
  if (config.repeats > 0) {
    args.repeats = config.repeats;
  }
  std::filesystem::create_directories(args.dir);
  return args;
}

// The sections, one per file.
int bench_split(const Config& config);
int bench_safetensors(const Config& config);
int bench_pickle(const Config& config);
int bench_model(const Config& config);
int bench_load_options(const Config& config);
int bench_dduf(const Config& config);
int bench_distributed(const Config& config);
int bench_cold(const Config& config);
int bench_gpu(const Config& config);
/// The rank processes bench_distributed starts (`--dist-rank ...`).
int bench_distributed_rank(int argc, char** argv);

} // namespace torchser::bench
