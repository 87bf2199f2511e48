// The 40 plans that huggingface_hub's own planner wrote to
// fixtures/reference/split/plans.json: torchser must give identical
// filename_to_tensors, tensor_to_filename, metadata and is_sharded.

#include <torchser/split.h>

#include <map>
#include <string>
#include <vector>

#include <ATen/ops/zeros.h>
#include <nlohmann/json.hpp>

#include "test_utils.h"

namespace torchser {
namespace {

using nlohmann::ordered_json;

const ordered_json& plans() {
  static const ordered_json doc =
      ordered_json::parse(torchser::testing::read_file(
          torchser::testing::fixtures_dir() / "reference/split/plans.json"));
  return doc;
}

at::ScalarType dtype_named(const std::string& name) {
  static const std::map<std::string, at::ScalarType> dtypes = {
      {"float16", at::kHalf},
      {"bfloat16", at::kBFloat16},
      {"float32", at::kFloat},
      {"float64", at::kDouble},
      {"int8", at::kChar},
      {"uint8", at::kByte},
      {"int16", at::kShort},
      {"int32", at::kInt},
      {"int64", at::kLong},
      {"bool", at::kBool}};
  return dtypes.at(name);
}

// Rebuilds a case's state dict as the fixture's _doc describes: tensors in
// 'tensors' order ('base' = a new zero tensor, 'same' = that base again,
// 'view' = base[1:]), then ordered as 'order'.
StateDict rebuild_state_dict(const ordered_json& c) {
  std::map<std::string, at::Tensor> bases;
  std::map<std::string, at::Tensor> by_name;
  for (const auto& t : c.at("tensors")) {
    const auto name = t.at("name").get<std::string>();
    if (t.contains("base")) {
      const auto shape = t.at("shape").get<std::vector<int64_t>>();
      auto tensor =
          at::zeros(shape, dtype_named(t.at("dtype").get<std::string>()));
      bases[t.at("base").get<std::string>()] = tensor;
      by_name[name] = tensor;
    } else {
      const auto& base = bases.at(t.at("shares_with").get<std::string>());
      const auto kind = t.at("kind").get<std::string>();
      by_name[name] = kind == "same" ? base : base.slice(0, 1);
    }
  }
  StateDict sd;
  for (const auto& name : c.at("order")) {
    sd.insert(name.get<std::string>(), by_name.at(name.get<std::string>()));
  }
  return sd;
}

ShardSize max_shard_size_of(const ordered_json& c) {
  const auto& max = c.at("max_shard_size");
  if (max.is_string()) {
    return ShardSize(max.get<std::string>());
  }
  return ShardSize(max.get<std::int64_t>());
}

class SplitPlansTest : public ::testing::TestWithParam<std::size_t> {};

TEST_P(SplitPlansTest, MatchesHuggingfaceHubPlan) {
  const auto& c = plans().at("cases").at(GetParam());
  const auto& expected = c.at("expected");
  const auto split = split_torch_state_dict_into_shards(
      rebuild_state_dict(c),
      SplitOptions().max_shard_size(max_shard_size_of(c)));

  EXPECT_EQ(split.is_sharded, expected.at("is_sharded").get<bool>());
  EXPECT_EQ(
      split.metadata.total_size,
      expected.at("metadata").at("total_size").get<std::int64_t>());
  ASSERT_EQ(expected.at("metadata").size(), 1U)
      << "the reference's metadata is only total_size";

  std::vector<std::pair<std::string, std::vector<std::string>>> want_files;
  for (const auto& [file, names] : expected.at("filename_to_tensors").items()) {
    want_files.emplace_back(file, names.get<std::vector<std::string>>());
  }
  std::vector<std::pair<std::string, std::vector<std::string>>> got_files;
  for (const auto& item : split.filename_to_tensors) {
    got_files.emplace_back(item.key(), item.value());
  }
  EXPECT_EQ(got_files, want_files);

  std::vector<std::pair<std::string, std::string>> want_owners;
  for (const auto& [name, file] : expected.at("tensor_to_filename").items()) {
    want_owners.emplace_back(name, file.get<std::string>());
  }
  std::vector<std::pair<std::string, std::string>> got_owners;
  for (const auto& item : split.tensor_to_filename) {
    got_owners.emplace_back(item.key(), item.value());
  }
  EXPECT_EQ(got_owners, want_owners);
}

TEST(SplitPlansFixtureTest, HasFortyCases) {
  EXPECT_EQ(plans().at("cases").size(), 40U);
}

INSTANTIATE_TEST_SUITE_P(
    Reference,
    SplitPlansTest,
    ::testing::Range<std::size_t>(0, 40),
    [](const ::testing::TestParamInfo<std::size_t>& info) {
      return "case_" + std::to_string(info.param);
    });

} // namespace
} // namespace torchser
