// Consolidating PyTorch DCP's sharded layout: the fixture PyTorch 2.13's
// HuggingFaceStorageWriter wrote on 2 Gloo ranks gives the tensors of
// PyTorch's own consolidation; broken layouts are ValueErrors naming the
// file and the tensor, and leave the destination's checkpoint whole.

#include <filesystem>
#include <map>
#include <string>

#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <torchser/consolidate.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using torchser::testing::TempDir;

namespace {

const fs::path kFixture = fs::path(TORCHSER_FIXTURES_DIR) / "dcp" / "world2";

std::map<std::string, at::Tensor> tensors_of(const fs::path& dir) {
  std::map<std::string, at::Tensor> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    // The result's files, not the shard files beside them.
    if (e.path().extension() == ".safetensors" &&
        e.path().filename().string().rfind("shard-", 0) != 0) {
      for (const auto& item : torchser::load_state_dict_from_file(e.path())) {
        out[item.key()] = item.value();
      }
    }
  }
  return out;
}

std::string message_of(const fs::path& in, const fs::path& out) {
  try {
    torchser::consolidate_safetensors_files(in, out);
  } catch (const torchser::ValueError& e) {
    return e.what();
  }
  return "no ValueError";
}

// A shard file of DCP's layout: `pieces` name → (tensor, saved_offsets).
void write_shard(
    const fs::path& path,
    const std::vector<
        std::tuple<std::string, at::Tensor, std::vector<std::int64_t>>>& pieces,
    bool with_info = true) {
  torchser::StateDict sd;
  std::string info = "{";
  for (const auto& [name, t, offsets] : pieces) {
    sd.insert(name, t);
    info += std::string(info.size() > 1 ? ", " : "") + "\"" + name +
            "\": {\"saved_offsets\": [";
    for (std::size_t i = 0; i < offsets.size(); ++i) {
      info += (i ? ", " : "") + std::to_string(offsets[i]);
    }
    info += "]}";
  }
  info += "}";
  torchser::SafetensorsMetadata metadata{
      {"format", "pt"}, {"DCP_VERSION", "1.0"}};
  if (with_info) {
    metadata["DCP_SHARDING_INFO"] = info;
  }
  torchser::save_file(sd, path, metadata);
}

TEST(ConsolidateTest, TheDcpFixtureConsolidatesToPyTorchsConsolidatedTensors) {
  TempDir dir;
  const auto result = torchser::consolidate_safetensors_files(
      kFixture / "sharded", dir / "out");
  EXPECT_EQ(result.input_files, 4u);
  EXPECT_EQ(result.tensors, 4u);
  EXPECT_EQ(result.total_bytes, 408u);
  EXPECT_EQ(
      result.files,
      (std::vector<std::string>{
          "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors",
          "model.safetensors.index.json"}));
  const auto ours = tensors_of(dir / "out");
  const auto theirs = tensors_of(kFixture);
  ASSERT_EQ(ours.size(), theirs.size());
  for (const auto& [name, t] : theirs) {
    ASSERT_EQ(ours.count(name), 1u) << name;
    EXPECT_EQ(ours.at(name).scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(ours.at(name), t)) << name;
  }
  // The same tensors in the same files as PyTorch's index says.
  EXPECT_EQ(
      torchser::testing::read_file(
          dir / "out" / "model.safetensors.index.json"),
      torchser::testing::read_file(kFixture / "model.safetensors.index.json"));
}

TEST(ConsolidateTest, EveryDtypeAndBlockPiecesConsolidate) {
  TempDir dir;
  fs::create_directories(dir / "in");
  const at::Tensor ids = at::arange(24, at::kLong).reshape({4, 6});
  const at::Tensor mask =
      at::arange(10, at::kInt).remainder(3).eq(0).reshape({2, 5});
  const at::Tensor half = at::arange(12, at::kHalf).reshape({3, 4});
  // ids in four 2x3 blocks; mask by columns; half whole in one file.
  write_shard(
      dir / "in" / "shard-00001-model-00001-of-00001.safetensors",
      {{"ids", ids.narrow(0, 0, 2).narrow(1, 0, 3).clone(), {0, 0}},
       {"mask", mask.narrow(1, 0, 2).clone(), {0, 0}},
       {"half", half, {0, 0}}});
  write_shard(
      dir / "in" / "shard-00002-model-00001-of-00001.safetensors",
      {{"ids", ids.narrow(0, 0, 2).narrow(1, 3, 3).clone(), {0, 3}},
       {"mask", mask.narrow(1, 2, 3).clone(), {0, 2}}});
  write_shard(
      dir / "in" / "shard-00003-model-00001-of-00001.safetensors",
      {{"ids", ids.narrow(0, 2, 2).narrow(1, 0, 3).clone(), {2, 0}}});
  write_shard(
      dir / "in" / "shard-00004-model-00001-of-00001.safetensors",
      {{"ids", ids.narrow(0, 2, 2).narrow(1, 3, 3).clone(), {2, 3}}});
  torchser::consolidate_safetensors_files(dir / "in", dir / "in");
  const auto out = tensors_of(dir / "in");
  EXPECT_TRUE(at::equal(out.at("ids"), ids));
  EXPECT_TRUE(at::equal(out.at("mask"), mask));
  EXPECT_TRUE(at::equal(out.at("half"), half));
  EXPECT_TRUE(fs::exists(dir / "in" / "model-00001-of-00001.safetensors"));
  // The shard files are kept beside the result.
  EXPECT_TRUE(
      fs::exists(dir / "in" / "shard-00004-model-00001-of-00001.safetensors"));
}

TEST(ConsolidateTest, BrokenLayoutsAreValueErrorsAndLeaveTheDestinationWhole) {
  TempDir dir;
  const at::Tensor w = at::arange(10, at::kFloat).reshape({5, 2});
  // The destination holds a checkpoint that must survive every failure.
  fs::create_directories(dir / "dst");
  torchser::StateDict old;
  old.insert("old", at::arange(3, at::kFloat));
  torchser::save_torch_state_dict(old, dir / "dst");
  const std::string old_bytes =
      torchser::testing::read_file(dir / "dst" / "model.safetensors");

  const auto layout = [&](const std::string& name) {
    fs::create_directories(dir / name);
    return dir / name;
  };
  fs::path in = layout("empty");
  EXPECT_THAT(message_of(in, dir / "dst"), HasSubstr("holds no shard files"));

  in = layout("no-info");
  write_shard(
      in / "shard-00001-model-00001-of-00001.safetensors",
      {{"w", w, {0, 0}}},
      false);
  EXPECT_THAT(
      message_of(in, dir / "dst"), HasSubstr("has no DCP_SHARDING_INFO"));

  in = layout("overlap");
  write_shard(
      in / "shard-00001-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 0, 3).clone(), {0, 0}}});
  write_shard(
      in / "shard-00002-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 2, 3).clone(), {2, 0}}});
  EXPECT_THAT(
      message_of(in, dir / "dst"),
      HasSubstr("Tensor 'w': the pieces of "
                "'shard-00001-model-00001-of-00001.safetensors' "
                "(offsets [0, 0], shape [3, 2]) and "
                "'shard-00002-model-00001-of-00001.safetensors' "
                "(offsets [2, 0], shape [3, 2]) overlap"));

  in = layout("hole");
  write_shard(
      in / "shard-00001-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 0, 2).clone(), {0, 0}}});
  write_shard(
      in / "shard-00002-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 3, 2).clone(), {3, 0}}});
  EXPECT_THAT(
      message_of(in, dir / "dst"),
      HasSubstr("hold 8 of its 10 elements, leaving 2 held by no piece"));

  in = layout("dtype");
  write_shard(
      in / "shard-00001-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 0, 2).clone(), {0, 0}}});
  write_shard(
      in / "shard-00002-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 2, 3).to(at::kDouble), {2, 0}}});
  EXPECT_THAT(
      message_of(in, dir / "dst"),
      HasSubstr("Tensor 'w' is F32 in shard-00001"));

  in = layout("missing-rank");
  write_shard(
      in / "shard-00001-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 0, 2).clone(), {0, 0}}});
  write_shard(
      in / "shard-00003-model-00001-of-00001.safetensors",
      {{"w", w.narrow(0, 2, 3).clone(), {2, 0}}});
  EXPECT_THAT(message_of(in, dir / "dst"), HasSubstr("none of shard 2"));

  in = layout("no-offsets");
  write_shard(
      in / "shard-00001-model-00001-of-00001.safetensors", {{"w", w, {0}}});
  EXPECT_THAT(
      message_of(in, dir / "dst"),
      HasSubstr("tensor 'w' of shape [5, 2] has saved_offsets [0]"));

  EXPECT_EQ(
      torchser::testing::read_file(dir / "dst" / "model.safetensors"),
      old_bytes);
  EXPECT_FALSE(fs::exists(dir / "dst" / "model.safetensors.index.json"));
}

TEST(ConsolidateTest, TheCliConsolidatesAndReportsBadLayouts) {
  TempDir dir;
  auto run = torchser::testing::run_command(
      std::string(TORCHSER_CLI) + " consolidate '" +
      (kFixture / "sharded").string() + "' '" + (dir / "out").string() + "'");
  EXPECT_EQ(run.status, 0) << run.output;
  EXPECT_THAT(
      run.output,
      HasSubstr("Consolidated 4 tensors (408 B) from 4 DCP shard files"));
  run = torchser::testing::run_command(
      std::string(TORCHSER_CLI) + " verify '" + (dir / "out").string() + "'");
  EXPECT_EQ(run.status, 0) << run.output;
  run = torchser::testing::run_command(
      std::string(TORCHSER_CLI) + " consolidate '" + dir.path().string() +
      "' '" + (dir / "x").string() + "'");
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(
      run.output,
      HasSubstr(
          "torchser: '" + dir.path().string() + "' holds no shard files"));
  run = torchser::testing::run_command(
      std::string(TORCHSER_CLI) + " consolidate");
  EXPECT_EQ(run.status, 2) << run.output;
}

} // namespace
