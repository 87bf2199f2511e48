// Checkpoints through Python and back (tests/interop/*.py), when
// /usr/bin/python3 has torch: torchser's sharded safetensors and pickle
// checkpoints read by Python, and Python's sharded pickle checkpoint loaded
// into an equivalent C++ module.

#include <torchser/load.h>
#include <torchser/save.h>

#include <cstdio>
#include <cstdlib>

#include <ATen/ops/arange.h>
#include <ATen/ops/rand.h>
#include <nlohmann/json.hpp>

#include <torchser/module.h>

#include "test_utils.h"
#include "tied_net.h"

namespace torchser {
namespace {

using json = nlohmann::json;

using torchser::testing::python_has_torch;

// Runs tests/interop/SCRIPT ARGUMENT; parses the JSON on its last line
// (torch may print warnings before it).
json run_script(
    const std::string& script,
    const std::filesystem::path& argument,
    const std::string& extra = "") {
  std::string out = torchser::testing::run_python(
      (std::filesystem::path(TORCHSER_INTEROP_DIR) / script).string() + " '" +
      argument.string() + "' " + extra);
  while (!out.empty() && out.back() == '\n') {
    out.pop_back();
  }
  const std::size_t last = out.rfind('\n');
  return json::parse(out.substr(last == std::string::npos ? 0 : last + 1));
}

#define SKIP_WITHOUT_PYTHON_TORCH()                                       \
  if (!python_has_torch()) {                                              \
    GTEST_SKIP()                                                          \
        << "python3 has no torch (apt-get install python3-torch to run)"; \
  }

double sum_of(const at::Tensor& t) {
  return t.is_complex() ? t.abs().to(at::kDouble).sum().item<double>()
                        : t.to(at::kDouble).sum().item<double>();
}

StateDict interop_state_dict() {
  StateDict sd;
  const auto embed = at::rand({32, 8});
  sd.insert("embed.weight", embed);
  sd.insert("lm_head.weight", embed); // tied
  sd.insert("proj.weight", at::rand({8, 8}).to(at::kHalf));
  sd.insert("proj.bias", at::rand({8}).to(at::kBFloat16));
  sd.insert("steps", at::arange(5, at::kLong));
  sd.insert("mask", at::rand({4}).gt(0.5));
  sd.insert("scale", at::rand({}, at::kDouble));
  return sd;
}

TEST(InteropTest, PythonReadsTorchserCheckpoints) {
  SKIP_WITHOUT_PYTHON_TORCH();
  const StateDict sd = interop_state_dict();
  for (const bool safe : {true, false}) {
    SCOPED_TRACE(safe ? "safetensors" : "pickle");
    torchser::testing::TempDir dir;
    save_torch_state_dict(
        sd,
        dir.path(),
        SaveOptions().safe_serialization(safe).max_shard_size(400));
    const json out = run_script("read_checkpoint.py", dir.path());
    std::cout << "[interop] read by " << out.at("tools").dump() << "\n";
    const json& tensors = out.at("tensors");
    for (const auto& item : sd) {
      if (safe && item.key() == "lm_head.weight") {
        EXPECT_FALSE(
            tensors.contains(item.key())); // stored once, as embed.weight
        continue;
      }
      ASSERT_TRUE(tensors.contains(item.key())) << item.key();
      const json& t = tensors.at(item.key());
      EXPECT_EQ(
          t.at("shape").get<std::vector<int64_t>>(), item.value().sizes().vec())
          << item.key();
      EXPECT_NEAR(
          t.at("sum").get<double>(),
          sum_of(item.value()),
          1e-6 * (1 + std::abs(sum_of(item.value()))))
          << item.key();
    }
    if (!safe) {
      EXPECT_EQ(
          out.at("sharing"),
          json::parse(R"([["embed.weight", "lm_head.weight"]])"));
    }
  }
}

using torchser::testing::TiedNet;

TEST(InteropTest, TorchserLoadsAPythonShardedCheckpoint) {
  SKIP_WITHOUT_PYTHON_TORCH();
  for (const bool safe : {false, true}) {
    SCOPED_TRACE(safe ? "safetensors" : "pickle");
    torchser::testing::TempDir dir;
    const json out = run_script(
        std::string("write_checkpoint.py"),
        dir.path(),
        safe ? "safetensors" : "pickle");
    std::cout << "[interop] written by " << out.at("tool").get<std::string>()
              << "\n";
    const json& written = out.at("tensors");
    TiedNet net;
    const LoadResult result = load_torch_model(
        net, dir.path(), LoadOptions().safe(safe).strict(false));
    EXPECT_TRUE(result.unexpected_keys.empty());
    if (safe) {
      // Python stores the tied pair once; the C++ module ties them itself.
      EXPECT_LE(result.missing_keys.size(), 1u);
      for (const auto& key : result.missing_keys) {
        EXPECT_TRUE(key == "head.weight" || key == "embed.weight") << key;
      }
    } else {
      EXPECT_TRUE(result.missing_keys.empty());
    }
    const StateDict sd = state_dict(net);
    ASSERT_EQ(sd.size(), written.size());
    for (const auto& item : sd) {
      const json& want = written.at(item.key());
      EXPECT_EQ(
          want.at("shape").get<std::vector<int64_t>>(),
          item.value().sizes().vec())
          << item.key();
      EXPECT_NEAR(want.at("sum").get<double>(), sum_of(item.value()), 1e-5)
          << item.key();
    }
  }
}

} // namespace
} // namespace torchser
