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
//     --load               load DIR into zeroed copies of the scenario's
//                          pieces instead, compare them with the pieces,
//                          print "rank R loaded BYTES_READ RCHAR PIECE_BYTES"
//                          and exit 0 when all match (4 when one differs)
//     --strict             LoadOptions::strict (with --load)
//     --read-once on|off   DistributedLoadOptions::read_once (with --load)
//     --direct             LoadOptions::backend(kDirect) (with --load)
//     --describe           after the load, print "rank R describe JSON":
//                          each local tensor's dtype, shape and bytes (hex),
//                          as tests/judges/judge.py describes tensors
//
// Prints "rank R ok BYTES" and exits 0 when the save committed; prints
// "rank R ERROR-TYPE: MESSAGE" and exits 3 when it threw.

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

#include <fstream>

#include <ATen/ops/zeros_like.h>

#include <torchser/distributed.h>
#include <torchser/distributed_load.h>
#include <torchser/errors.h>
#include <torchser/process_group.h>
#include <torchser/safetensors.h>

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
  if (dynamic_cast<const torchser::RuntimeError*>(&e) != nullptr) {
    return "RuntimeError";
  }
  if (dynamic_cast<const torchser::OSError*>(&e) != nullptr) {
    return "OSError";
  }
  if (dynamic_cast<const torchser::Error*>(&e) != nullptr) {
    return "torchser::Error";
  }
  return "std::exception";
}

std::int64_t rchar() {
  std::ifstream io("/proc/self/io");
  std::string key;
  std::int64_t value = 0;
  while (io >> key >> value) {
    if (key == "rchar:") {
      return value;
    }
  }
  return -1;
}

// Loads `dir` into zeroed copies of the scenario's pieces (tied pieces
// stay one tensor) and compares them with the pieces.
// {"NAME": {"dtype": "F32", "shape": [...], "hex": "..."}, ...} of the
// local tensors, for a judge to compare with its own reader's pieces.
std::string describe_json(const torchser::DistributedStateDict& sd) {
  static const char* digits = "0123456789abcdef";
  std::string out = "{";
  for (const auto& item : sd) {
    const at::Tensor t = item.value().local.contiguous();
    std::string shape;
    for (const std::int64_t d : t.sizes()) {
      shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    }
    std::string hex;
    const auto* p = static_cast<const std::uint8_t*>(t.data_ptr());
    for (std::size_t i = 0; i < static_cast<std::size_t>(t.nbytes()); ++i) {
      hex += digits[p[i] >> 4];
      hex += digits[p[i] & 15];
    }
    out += std::string(out.size() > 1 ? ", " : "") + "\"" + item.key() +
           "\": {\"dtype\": \"" +
           torchser::safetensors_dtype_name(
               torchser::to_safetensors_dtype(t.scalar_type())) +
           "\", \"shape\": [" + shape + "], \"hex\": \"" + hex + "\"}";
  }
  return out + "}";
}

int load_and_compare(
    const torchser::testing::Scenario& s,
    const std::string& dir,
    const torchser::ProcessGroup& group,
    const torchser::LoadOptions& options,
    const torchser::DistributedLoadOptions& distributed,
    bool describe) {
  torchser::DistributedStateDict targets;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  std::int64_t piece_bytes = 0;
  for (const auto& item : s.local) {
    torchser::DistributedTensor t = item.value();
    const auto same =
        std::find_if(copies.begin(), copies.end(), [&](const auto& c) {
          return c.first.is_same(t.local);
        });
    if (same != copies.end()) {
      t.local = same->second;
    } else {
      const at::Tensor zeros = at::zeros_like(t.local);
      copies.emplace_back(t.local, zeros);
      piece_bytes += static_cast<std::int64_t>(t.local.nbytes());
      t.local = zeros;
    }
    targets.insert(item.key(), t);
  }
  const std::int64_t before = rchar();
  const auto result = torchser::load_torch_state_dict(
      targets, dir, group, options, distributed);
  const std::int64_t read = rchar() - before;
  int status = 0;
  for (const auto& item : s.local) {
    if (!targets[item.key()]
             .local.to(item.value().local.scalar_type())
             .equal(item.value().local)) {
      std::cout << "rank " << group.rank() << " differs: " << item.key()
                << std::endl;
      status = 4;
    }
  }
  std::cout << "rank " << group.rank() << " loaded " << result.bytes_read << " "
            << read << " " << piece_bytes << " missing "
            << result.missing_keys.size() << " unexpected "
            << result.unexpected_keys.size() << " received "
            << result.bytes_received << std::endl;
  if (describe) {
    std::cout << "rank " << group.rank() << " describe "
              << describe_json(targets) << std::endl;
  }
  return status;
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
  bool load = false;
  bool describe = false;
  torchser::LoadOptions load_options;
  torchser::DistributedLoadOptions distributed_options;
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
      load_options.safe(false);
    } else if (arg == "--load") {
      load = true;
    } else if (arg == "--strict") {
      load_options.strict(true);
    } else if (arg == "--describe") {
      describe = true;
    } else if (arg == "--direct") {
      load_options.backend(torchser::LoadBackend::kDirect);
    } else if (arg == "--read-once") {
      distributed_options.read_once(next() == "on");
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
    const auto progress = [&](const torchser::Progress&) {
      ++pieces;
      if (pieces == kill_after) {
        std::raise(SIGKILL);
      }
      if (pieces == hang_after) {
        std::this_thread::sleep_for(std::chrono::hours(1));
      }
    };
    options.progress(progress);
    load_options.progress(progress);
    const auto s = torchser::testing::make_scenario(scenario, rank, world);
    if (load) {
      return load_and_compare(
          s, dir, group, load_options, distributed_options, describe);
    }
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
