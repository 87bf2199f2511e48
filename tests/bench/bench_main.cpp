// torchser_bench: every benchmark in one run on this machine, printed as one
// markdown report (the README's Performance section is its output). Each
// section measures torchser beside the physical limits (memcpy, raw write()
// and read() of the same bytes) and the peers (torch::save / torch::load,
// Python torch and huggingface_hub via /usr/bin/python3 when importable),
// alternating them round by round, and prints ratios of the same run.
//
// Usage: torchser_bench [--quick] [--only
// split,safetensors,pickle,model,load,dduf,
//                       distributed,cold,gpu]
//                       [--dir DIR] [--mib N] [--repeats N] [--max-tensors N]
//                       [--python-max-tensors N] [--no-python]
//   --quick   CI mode: 16 MiB workloads, one repeat, planner up to 10k tensors
//             (seconds in all; the figures only show that everything runs).

#include <sys/utsname.h>
#include <unistd.h>

#include <ctime>
#include <functional>
#include <iostream>
#include <sstream>
#include <utility>

#include "bench_utils.h"

using namespace torchser::bench;

namespace {

const std::vector<std::pair<std::string, std::function<int(const Config&)>>>
    kSections = {
        {"split", bench_split},
        {"safetensors", bench_safetensors},
        {"pickle", bench_pickle},
        {"model", bench_model},
        {"load", bench_load_options},
        {"dduf", bench_dduf},
        {"distributed", bench_distributed},
        {"cold", bench_cold},
        {"gpu", bench_gpu},
};

int usage(const char* argv0, int code) {
  (code == 0 ? std::cout : std::cerr)
      << "usage: " << argv0
      << " [--quick] [--only SECTION[,SECTION...]] [--dir DIR] [--mib N] "
         "[--repeats N]\n"
         "       [--max-tensors N] [--python-max-tensors N] [--no-python]\n"
         "sections: split safetensors pickle model load dduf distributed cold "
         "gpu "
         "(default: "
         "all)\n";
  return code;
}

} // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--dist-rank") {
    return bench_distributed_rank(argc, argv);
  }
  Config config;
  config.dir =
      (std::filesystem::temp_directory_path() / "torchser-bench").string();
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << arg << " needs a value\n";
        std::exit(usage(argv[0], 2));
      }
      return argv[++i];
    };
    if (arg == "--quick") {
      config.quick = true;
    } else if (arg == "--no-python") {
      python_enabled() = false;
    } else if (arg == "--only") {
      only = "," + value() + ",";
    } else if (arg == "--dir") {
      config.dir = value();
    } else if (arg == "--mib") {
      config.mib = std::stoll(value());
    } else if (arg == "--repeats") {
      config.repeats = std::stoi(value());
    } else if (arg == "--max-tensors") {
      config.max_tensors = std::stoll(value());
    } else if (arg == "--python-max-tensors") {
      config.python_max_tensors = std::stoll(value());
    } else if (arg == "--help" || arg == "-h") {
      return usage(argv[0], 0);
    } else {
      std::cerr << "unknown argument " << arg << "\n";
      return usage(argv[0], 2);
    }
  }

  utsname host{};
  ::uname(&host);
  char date[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  std::cout << "# torchser benchmark report"
            << (config.quick ? " (quick mode: sizes too small to mean much)"
                             : "")
            << "\n\n"
            << date << ", " << ::sysconf(_SC_NPROCESSORS_ONLN)
            << " cores, Linux " << host.release
            << "; every ratio compares two figures of the same run.\n"
            << std::flush;
  int failures = 0;
  for (const auto& [name, run] : kSections) {
    if (!only.empty() && only.find("," + name + ",") == std::string::npos) {
      continue;
    }
    std::cout << "\n## " << name << "\n\n" << std::flush;
    if (run(config) != 0) {
      std::cerr << "section " << name << " failed\n";
      ++failures;
    }
    std::cout << std::flush;
  }
  return failures == 0 ? 0 : 1;
}
