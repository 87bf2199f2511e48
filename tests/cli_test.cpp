// The torchser command-line tool, run as a user would.

#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include <ATen/ops/arange.h>
#include <nlohmann/json.hpp>

#include <torchser/load.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"

namespace torchser {
namespace {

using ::testing::HasSubstr;
using torchser::testing::TempDir;

struct CliRun {
  int status;
  std::string output; // stdout and stderr
};

// Runs `SHELL_PREFIX torchser ARGUMENTS` through sh (a prefix sets limits).
CliRun cli_with_prefix(const std::string& shell_prefix, const std::string& arguments) {
  FILE* pipe = ::popen((shell_prefix + std::string(TORCHSER_CLI) + " " + arguments + " 2>&1").c_str(), "r");
  std::string out;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe) != nullptr) {
    out += buffer;
  }
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

CliRun cli(const std::string& arguments) {
  return cli_with_prefix("", arguments);
}

std::string quoted(const std::filesystem::path& path) {
  return "'" + path.string() + "'";
}

// verify once failed on every valid safetensors input (a reference into a
// destroyed reader): files torchser wrote, and a checkpoint Python wrote.
TEST(CliTest, VerifyAcceptsValidSafetensorsFilesAndCheckpoints) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 6; ++i) {
    sd.insert("layer." + std::to_string(i) + ".weight", at::arange(i, i + 40, at::kFloat));
  }
  TempDir other;
  save_file(sd, other / "single.safetensors");
  save_torch_state_dict(sd, dir.path(), SaveOptions().max_shard_size(400));
  ASSERT_TRUE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  const std::filesystem::path python_written = torchser::testing::fixtures_dir() / "dcp" / "world2";
  for (const auto& target : {other / "single.safetensors", dir.path(), dir / "model-00001-of-00003.safetensors",
                             python_written}) {
    const CliRun run = cli("verify " + quoted(target));
    EXPECT_EQ(run.status, 0) << target << ": " << run.output;
    EXPECT_THAT(run.output, HasSubstr("OK: ")) << target;
  }
}

TEST(CliTest, InspectListsTensorsMetadataAndTotals) {
  TempDir dir;
  StateDict sd;
  sd.insert("w", at::arange(6, at::kFloat).view({2, 3}));
  save_file(sd, dir / "m.safetensors", SafetensorsMetadata{{"format", "pt"}});
  const CliRun human = cli("inspect " + quoted(dir / "m.safetensors"));
  EXPECT_EQ(human.status, 0) << human.output;
  EXPECT_THAT(human.output, HasSubstr("w  F32  [2, 3]  24 B"));
  EXPECT_THAT(human.output, HasSubstr("metadata format = pt"));
  EXPECT_THAT(human.output, HasSubstr("1 tensors, 24 B"));
  const CliRun machine = cli("inspect --json " + quoted(dir / "m.safetensors"));
  const auto out = nlohmann::json::parse(machine.output);
  EXPECT_EQ(out["tensors"][0]["shape"], nlohmann::json::parse("[2, 3]"));
  EXPECT_EQ(out["total_bytes"], 24);
  const auto sharded = nlohmann::json::parse(
      cli("inspect --json " + quoted(torchser::testing::fixtures_dir() / "reference/pickle/sharded")).output);
  EXPECT_EQ(sharded["total_tensors"], 7);
  EXPECT_EQ(sharded["metadata"]["total_size"], "1568");
  const auto dduf = nlohmann::json::parse(
      cli("inspect --json " + quoted(torchser::testing::fixtures_dir() / "reference/dduf/tiny_pipeline.dduf")).output);
  EXPECT_EQ(dduf["entries"]["model_index.json"], 254);
}

TEST(CliTest, VerifyExitCodesAndMessages) {
  const auto fixtures = torchser::testing::fixtures_dir();
  EXPECT_EQ(cli("verify " + quoted(fixtures / "reference/dduf/tiny_pipeline.dduf")).status, 0);
  EXPECT_EQ(cli("verify " + quoted(fixtures / "reference/pickle/sharded")).status, 0);
  const CliRun bad = cli("verify " + quoted(fixtures / "reference/dduf/compressed.dduf"));
  EXPECT_EQ(bad.status, 1);
  EXPECT_THAT(bad.output, HasSubstr("torchser: Data must not be compressed in DDUF file."));
  TempDir dir;
  std::ofstream(dir / "x.safetensors", std::ios::binary) << std::string("\x08\0\0\0\0\0\0\0{}      x", 17);
  const CliRun trailing = cli("verify " + quoted(dir / "x.safetensors"));
  EXPECT_EQ(trailing.status, 1);
  EXPECT_THAT(trailing.output, HasSubstr("incomplete metadata, file not fully covered"));
}

TEST(CliTest, VerifyRefusesAnIndexThatDisagreesWithItsShards) {
  TempDir dir;
  StateDict a;
  a.insert("a", at::arange(4, at::kFloat));
  StateDict b;
  b.insert("b", at::arange(4, at::kFloat));
  b.insert("c", at::arange(4, at::kFloat));
  save_file(a, dir / "model-00001-of-00002.safetensors", SafetensorsMetadata{{"format", "pt"}});
  save_file(b, dir / "model-00002-of-00002.safetensors", SafetensorsMetadata{{"format", "pt"}});
  const auto index = [&](const std::string& weight_map) {
    std::ofstream(dir / "model.safetensors.index.json")
        << R"({"metadata": {"total_size": 48}, "weight_map": )" << weight_map << "}";
  };
  index(R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",)"
        R"( "c": "model-00002-of-00002.safetensors"})");
  EXPECT_EQ(cli("verify " + quoted(dir.path())).status, 0);
  // A tensor placed in the wrong shard (of two the index names).
  index(R"({"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",)"
        R"( "c": "model-00002-of-00002.safetensors"})");
  const CliRun wrong = cli("verify " + quoted(dir.path()));
  EXPECT_EQ(wrong.status, 1) << wrong.output;
  EXPECT_THAT(wrong.output, HasSubstr("names tensor 'b' in 'model-00001-of-00002.safetensors', but that shard does "
                                      "not hold it (it is in 'model-00002-of-00002.safetensors')"));
  // A tensor a shard holds that the index does not list.
  index(R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})");
  const CliRun unlisted = cli("verify " + quoted(dir.path()));
  EXPECT_EQ(unlisted.status, 1) << unlisted.output;
  EXPECT_THAT(unlisted.output, HasSubstr("holds tensor 'c', which the index model.safetensors.index.json does not list"));
}

// The layouts the library loads: a Hub folder with both formats (safetensors
// first), a folder holding one .dduf, an index named directly.
TEST(CliTest, AcceptsTheLayoutsTheLibraryLoads) {
  TempDir hub;
  StateDict sd;
  sd.insert("w", at::arange(6, at::kFloat));
  save_file(sd, hub / "model.safetensors", SafetensorsMetadata{{"format", "pt"}});
  torch_save(sd, hub / "pytorch_model.bin");
  for (const char* command : {"verify", "inspect"}) {
    const CliRun run = cli(std::string(command) + " " + quoted(hub.path()));
    EXPECT_EQ(run.status, 0) << command << ": " << run.output;
    EXPECT_THAT(run.output, HasSubstr("using model.safetensors")) << command;
  }
  TempDir with_dduf;
  std::filesystem::copy_file(torchser::testing::fixtures_dir() / "reference/dduf/tiny_pipeline.dduf",
                             with_dduf / "tiny_pipeline.dduf");
  const CliRun dduf = cli("verify " + quoted(with_dduf.path()));
  EXPECT_EQ(dduf.status, 0) << dduf.output;
  EXPECT_THAT(dduf.output, HasSubstr("DDUF"));
  const auto index = torchser::testing::fixtures_dir() / "reference/pickle/sharded/pytorch_model.bin.index.json";
  const CliRun by_index = cli("verify " + quoted(index));
  EXPECT_EQ(by_index.status, 0) << by_index.output;
  EXPECT_THAT(by_index.output, HasSubstr("3 files"));
  const CliRun listed = cli("inspect " + quoted(index));
  EXPECT_THAT(listed.output, HasSubstr("pytorch_model-00001-of-00003.bin"));
}

TEST(CliTest, VerifyChecksTheCrcOfEveryPickleRecord) {
  TempDir dir;
  StateDict sd;
  sd.insert("w", at::arange(1000, at::kFloat));
  torch_save(sd, dir / "model.bin");
  ASSERT_EQ(cli("verify " + quoted(dir / "model.bin")).status, 0);
  // One byte of tensor data flipped: torch_load maps it without noticing.
  std::string bytes = torchser::testing::read_file(dir / "model.bin");
  const std::size_t at = bytes.find(std::string("\0\0\x80\x3f", 4)); // 1.0f, the second element
  ASSERT_NE(at, std::string::npos);
  bytes[at + 3] ^= 0x01;
  std::ofstream(dir / "model.bin", std::ios::binary | std::ios::trunc) << bytes;
  const CliRun run = cli("verify " + quoted(dir / "model.bin"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("Record 'model/data/0' of"));
  EXPECT_THAT(run.output, HasSubstr("is corrupt: CRC-32"));
}

TEST(CliTest, InspectCountsATiedStorageOnce) {
  TempDir dir;
  StateDict sd;
  const auto embed = at::arange(1000, at::kFloat); // 4000 bytes
  sd.insert("embed.weight", embed);
  sd.insert("lm_head.weight", embed);
  sd.insert("bias", at::arange(10, at::kFloat)); // 40 bytes
  torch_save(sd, dir / "tied.bin");
  const auto out = nlohmann::json::parse(cli("inspect --json " + quoted(dir / "tied.bin")).output);
  EXPECT_EQ(out["total_bytes"], 4040);
  EXPECT_EQ(out["total_tensors"], 3);
}

TEST(CliTest, VerifyRefusesAnIndexWhoseShardsLeaveTheDirectory) {
  // The CLI reads indexes with the loader's checks: nothing outside the
  // checkpoint directory is opened.
  TempDir dir;
  std::filesystem::create_directories(dir / "ckpt");
  StateDict sd;
  sd.insert("w", at::arange(4, at::kFloat));
  save_file(sd, dir / "outside.safetensors", SafetensorsMetadata{{"format", "pt"}});
  std::ofstream(dir / "ckpt" / "model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"w": "../outside.safetensors"}})";
  for (const char* command : {"verify", "inspect"}) {
    const CliRun run = cli(std::string(command) + " " + quoted(dir / "ckpt"));
    EXPECT_EQ(run.status, 1) << command;
    EXPECT_THAT(run.output, HasSubstr("Shard filenames must be relative paths without '..' components.")) << command;
  }
}

TEST(CliTest, ConvertsBetweenPickleAndSafetensors) {
  TempDir dir;
  const auto source = torchser::testing::fixtures_dir() / "reference/pickle/sharded";
  const CliRun to_st = cli("convert " + quoted(source) + " " + quoted(dir / "st") + " --max-shard-size 0.6KB");
  ASSERT_EQ(to_st.status, 0) << to_st.output;
  EXPECT_TRUE(std::filesystem::exists(dir / "st/model.safetensors.index.json"));
  const CliRun back = cli("convert " + quoted(dir / "st") + " " + quoted(dir / "bin") + " --to pickle");
  ASSERT_EQ(back.status, 0) << back.output;
  const StateDict a = load_state_dict_from_file(source / "pytorch_model-00001-of-00003.bin");
  const StateDict b = load_state_dict_from_file(dir / "bin/pytorch_model.bin");
  for (const auto& item : a) {
    EXPECT_TRUE(b[item.key()].equal(item.value())) << item.key();
  }
}

TEST(CliTest, PackAndUnpackRoundTrip) {
  TempDir dir;
  const auto folder = dir / "pipeline";
  std::filesystem::create_directories(folder / "vae");
  std::ofstream(folder / "model_index.json") << R"({"vae": 1})";
  std::ofstream(folder / "vae/config.json") << R"({"x": 1})";
  ASSERT_EQ(cli("pack " + quoted(folder) + " " + quoted(dir / "p.dduf")).status, 0);
  const CliRun unpacked = cli("unpack " + quoted(dir / "p.dduf") + " " + quoted(dir / "out"));
  ASSERT_EQ(unpacked.status, 0) << unpacked.output;
  EXPECT_EQ(torchser::testing::read_file(dir / "out/vae/config.json"), R"({"x": 1})");
  EXPECT_EQ(torchser::testing::read_file(dir / "out/model_index.json"), R"({"vae": 1})");
}

// A pipeline folder whose weights make the archive larger than 64 KiB.
std::filesystem::path big_pipeline(const TempDir& dir) {
  const auto folder = dir / "pipeline";
  std::filesystem::create_directories(folder / "unet");
  std::ofstream(folder / "model_index.json") << R"({"unet": 1})";
  std::ofstream(folder / "unet/config.json") << R"({"x": 1})";
  StateDict sd;
  sd.insert("w", at::arange(50000, at::kFloat));
  save_file(sd, folder / "unet/diffusion_pytorch_model.safetensors");
  return folder;
}

TEST(CliTest, UnpackFailsLoudlyWhenAWriteFailsAndLeavesNoPartialFile) {
  TempDir dir;
  ASSERT_EQ(cli("pack " + quoted(big_pipeline(dir)) + " " + quoted(dir / "p.dduf")).status, 0);
  // 64 KiB file-size limit, SIGXFSZ ignored: writes past it fail with EFBIG.
  const CliRun run = cli_with_prefix("ulimit -f 64; trap '' XFSZ; ", "unpack " + quoted(dir / "p.dduf") + " " +
                                                                         quoted(dir / "out"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("File too large"));
  EXPECT_THAT(run.output, HasSubstr("diffusion_pytorch_model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir / "out/unet/diffusion_pytorch_model.safetensors"));
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir / "out")) {
    EXPECT_EQ(e.path().lexically_relative(dir / "out").string().find("tmp"), std::string::npos)
        << "left behind: " << e.path();
  }
}

TEST(CliTest, UnpackRefusesToWriteThroughASymlinkInTheTarget) {
  TempDir dir;
  ASSERT_EQ(cli("pack " + quoted(big_pipeline(dir)) + " " + quoted(dir / "p.dduf")).status, 0);
  std::ofstream(dir / "victim.txt") << "precious";
  std::filesystem::create_directories(dir / "out/unet");
  std::filesystem::create_symlink(dir / "victim.txt", dir / "out/unet/config.json");
  const CliRun run = cli("unpack " + quoted(dir / "p.dduf") + " " + quoted(dir / "out"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("symbolic link"));
  EXPECT_EQ(torchser::testing::read_file(dir / "victim.txt"), "precious");
  // And a symlinked folder is refused the same way.
  TempDir other;
  std::filesystem::create_directories(other / "elsewhere");
  std::filesystem::create_directory_symlink(other / "elsewhere", other / "unet");
  const CliRun folder = cli("unpack " + quoted(dir / "p.dduf") + " " + quoted(other.path()));
  EXPECT_EQ(folder.status, 1) << folder.output;
  EXPECT_TRUE(std::filesystem::is_empty(other / "elsewhere"));
}

TEST(CliTest, PackRefusesFilesDdufCannotHold) {
  TempDir dir;
  const auto folder = big_pipeline(dir);
  std::ofstream(folder / "unet/diffusion_pytorch_model.bin") << "pickle";
  const CliRun run = cli("pack " + quoted(folder) + " " + quoted(dir / "p.dduf"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("DDUF cannot hold unet/diffusion_pytorch_model.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir / "p.dduf"));
}

TEST(CliTest, ConvertTakesShardSizesInBytesAndLeavesNothingWhenItFails) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 4; ++i) {
    sd.insert("w" + std::to_string(i), at::arange(i, i + 100, at::kFloat));
  }
  save_file(sd, dir / "in.safetensors");
  const CliRun run = cli("convert " + quoted(dir / "in.safetensors") + " " + quoted(dir / "out") +
                         " --max-shard-size 800 --to bin");
  ASSERT_EQ(run.status, 0) << run.output;
  EXPECT_TRUE(std::filesystem::exists(dir / "out/pytorch_model.bin.index.json"));
  EXPECT_TRUE(std::filesystem::exists(dir / "out/pytorch_model-00002-of-00002.bin"));
  const CliRun bad = cli("convert " + quoted(dir / "in.safetensors") + " " + quoted(dir / "bad") +
                         " --max-shard-size 1oo");
  EXPECT_EQ(bad.status, 1) << bad.output;
  EXPECT_THAT(bad.output, HasSubstr("1oo"));
  EXPECT_FALSE(std::filesystem::exists(dir / "bad"));
}

TEST(CliTest, VersionAndUsageErrorsFollowTheConventions) {
  const CliRun version = cli("--version");
  EXPECT_EQ(version.status, 0) << version.output;
  EXPECT_THAT(version.output, HasSubstr("torchser "));
  EXPECT_THAT(version.output, HasSubstr("LibTorch "));
  EXPECT_EQ(cli("convert only-one-argument").status, 2);
  EXPECT_EQ(cli("frobnicate").status, 2);
  EXPECT_EQ(cli("").status, 2);
}

TEST(CliTest, EveryCommandHasHelp) {
  for (const char* command : {"", "inspect ", "verify ", "convert ", "pack ", "unpack "}) {
    const CliRun help = cli(std::string(command) + "--help");
    EXPECT_EQ(help.status, 0) << command;
    EXPECT_THAT(help.output, HasSubstr("Usage")) << command;
  }
  EXPECT_NE(cli("frobnicate").status, 0);
}

} // namespace
} // namespace torchser
