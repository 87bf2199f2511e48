// One rank of a distributed-save test (started once per rank by
// distributed_test.cpp on 127.0.0.1, with a FileStore rendezvous):
//
//   dist_worker SCENARIO DIR RANK WORLD STORE_FILE [options]
//     --max-shard-size S   SaveOptions::max_shard_size
//     --timeout-ms T       the group's timeout (default 20000)
//     --kill-after N       SIGKILL itself after writing N pieces
//     --hang-after N       stop (sleep) after writing N pieces
//     --exit-before-save   leave before the save (after the group formed)
//     --key-mapping        save with add_prefix("model.")
//     --dtype bf16         SaveOptions::dtype
//     --checksums          SaveOptions::checksums
//     --bin                SaveOptions::safe_serialization(false)
//
// Prints "rank R ok BYTES" and exits 0 when the save committed; prints
// "rank R ERROR-TYPE: MESSAGE" and exits 3 when it threw.

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

#include <torchser/distributed.h>
#include <torchser/errors.h>
#include <torchser/process_group.h>

#include "dist_scenarios.h"

namespace {

const char* type_of(const std::exception& e) {
  if (dynamic_cast<const torchser::DistBackendError*>(&e) != nullptr) {
    return "DistBackendError";
  }
  if (dynamic_cast<const torchser::DistError*>(&e) != nullptr) {
    return "DistError";
  }
  if (dynamic_cast<const torchser::ValueError*>(&e) != nullptr) {
    return "ValueError";
  }
  if (dynamic_cast<const torchser::OSError*>(&e) != nullptr) {
    return "OSError";
  }
  if (dynamic_cast<const torchser::Error*>(&e) != nullptr) {
    return "torchser::Error";
  }
  return "std::exception";
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::cerr
        << "usage: dist_worker SCENARIO DIR RANK WORLD STORE_FILE [options]\n";
    return 2;
  }
  const std::string scenario = argv[1];
  const std::string dir = argv[2];
  const int rank = std::atoi(argv[3]);
  const int world = std::atoi(argv[4]);
  const std::string store = argv[5];
  torchser::SaveOptions options;
  long timeout_ms = 20000;
  int kill_after = -1;
  int hang_after = -1;
  bool exit_before_save = false;
  for (int i = 6; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << arg << " needs a value\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--max-shard-size") {
      options.max_shard_size(torchser::testing::shard_size(next()));
    } else if (arg == "--timeout-ms") {
      timeout_ms = std::stol(next());
    } else if (arg == "--kill-after") {
      kill_after = std::stoi(next());
    } else if (arg == "--hang-after") {
      hang_after = std::stoi(next());
    } else if (arg == "--exit-before-save") {
      exit_before_save = true;
    } else if (arg == "--checksums") {
      options.checksums(true);
    } else if (arg == "--bin") {
      options.safe_serialization(false);
    } else if (arg == "--key-mapping") {
      options.key_mapping(torchser::KeyMapping().add_prefix("model."));
    } else if (arg == "--dtype") {
      const std::string d = next();
      options.dtype(
          d == "bf16"   ? at::kBFloat16
          : d == "fp16" ? at::kHalf
                        : at::kFloat);
    } else {
      std::cerr << "unknown option " << arg << "\n";
      return 2;
    }
  }
  try {
    const torchser::ProcessGroup group = torchser::init_process_group(
        torchser::ProcessGroupOptions()
            .init_method("file://" + store)
            .rank(rank)
            .world_size(world)
            .hostname("127.0.0.1")
            .timeout(std::chrono::milliseconds(timeout_ms)));
    if (exit_before_save) {
      return 0;
    }
    int pieces = 0;
    options.progress([&](const torchser::Progress&) {
      ++pieces;
      if (pieces == kill_after) {
        std::raise(SIGKILL);
      }
      if (pieces == hang_after) {
        std::this_thread::sleep_for(std::chrono::hours(1));
      }
    });
    const auto s = torchser::testing::make_scenario(scenario, rank, world);
    const auto result =
        torchser::save_torch_state_dict(s.local, dir, group, options);
    std::cout << "rank " << rank << " ok " << result.bytes_written << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cout << "rank " << rank << " " << type_of(e) << ": " << e.what()
              << std::endl;
    return 3;
  }
}
