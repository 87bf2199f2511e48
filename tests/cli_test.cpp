// The torchser command-line tool, run as a user would.

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include <cstdio>
#include <fstream>

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <nlohmann/json.hpp>

#include <torchser/dduf.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"
#include "tied_net.h"

namespace torchser {
namespace {

using ::testing::HasSubstr;
using torchser::testing::TempDir;

using CliRun = torchser::testing::CommandRun;

// Runs `SHELL_PREFIX torchser ARGUMENTS` through sh (a prefix sets limits).
CliRun cli_with_prefix(
    const std::string& shell_prefix, const std::string& arguments) {
  return torchser::testing::run_command(
      shell_prefix + std::string(TORCHSER_CLI) + " " + arguments);
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
    sd.insert(
        "layer." + std::to_string(i) + ".weight",
        at::arange(i, i + 40, at::kFloat));
  }
  TempDir other;
  save_file(sd, other / "single.safetensors");
  save_torch_state_dict(sd, dir.path(), SaveOptions().max_shard_size(400));
  ASSERT_TRUE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  const std::filesystem::path python_written =
      torchser::testing::fixtures_dir() / "dcp" / "world2";
  for (const auto& target :
       {other / "single.safetensors",
        dir.path(),
        dir / "model-00001-of-00003.safetensors",
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
      cli("inspect --json " +
          quoted(
              torchser::testing::fixtures_dir() / "reference/pickle/sharded"))
          .output);
  EXPECT_EQ(sharded["total_tensors"], 7);
  EXPECT_EQ(
      sharded["metadata"]["total_size"], 1568); // a number, as in the index
  EXPECT_EQ(sharded["format"], "pickle");
  EXPECT_EQ(sharded["sharded"], true);
  EXPECT_EQ(sharded["files"], 3);
  EXPECT_EQ(
      sharded["tensors"][0]["dtype"], "F32"); // one vocabulary for both formats
  const auto dduf = nlohmann::json::parse(
      cli("inspect --json " + quoted(
                                  torchser::testing::fixtures_dir() /
                                  "reference/dduf/tiny_pipeline.dduf"))
          .output);
  EXPECT_EQ(dduf["entries"]["model_index.json"], 254);
}

TEST(CliTest, VerifyExitCodesAndMessages) {
  const auto fixtures = torchser::testing::fixtures_dir();
  EXPECT_EQ(
      cli("verify " + quoted(fixtures / "reference/dduf/tiny_pipeline.dduf"))
          .status,
      0);
  EXPECT_EQ(
      cli("verify " + quoted(fixtures / "reference/pickle/sharded")).status, 0);
  const CliRun bad =
      cli("verify " + quoted(fixtures / "reference/dduf/compressed.dduf"));
  EXPECT_EQ(bad.status, 1);
  EXPECT_THAT(
      bad.output,
      HasSubstr("torchser: Data must not be compressed in DDUF file."));
  TempDir dir;
  std::ofstream(dir / "x.safetensors", std::ios::binary)
      << std::string("\x08\0\0\0\0\0\0\0{}      x", 17);
  const CliRun trailing = cli("verify " + quoted(dir / "x.safetensors"));
  EXPECT_EQ(trailing.status, 1);
  EXPECT_THAT(
      trailing.output,
      HasSubstr("incomplete metadata, file not fully covered"));
}

TEST(CliTest, VerifyRefusesAnIndexThatDisagreesWithItsShards) {
  TempDir dir;
  StateDict a;
  a.insert("a", at::arange(4, at::kFloat));
  StateDict b;
  b.insert("b", at::arange(4, at::kFloat));
  b.insert("c", at::arange(4, at::kFloat));
  save_file(
      a,
      dir / "model-00001-of-00002.safetensors",
      SafetensorsMetadata{{"format", "pt"}});
  save_file(
      b,
      dir / "model-00002-of-00002.safetensors",
      SafetensorsMetadata{{"format", "pt"}});
  const auto index = [&](const std::string& weight_map) {
    std::ofstream(dir / "model.safetensors.index.json")
        << R"({"metadata": {"total_size": 48}, "weight_map": )" << weight_map
        << "}";
  };
  index(
      R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",)"
      R"( "c": "model-00002-of-00002.safetensors"})");
  EXPECT_EQ(cli("verify " + quoted(dir.path())).status, 0);
  // A tensor placed in the wrong shard (of two the index names).
  index(
      R"({"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",)"
      R"( "c": "model-00002-of-00002.safetensors"})");
  const CliRun wrong = cli("verify " + quoted(dir.path()));
  EXPECT_EQ(wrong.status, 1) << wrong.output;
  EXPECT_THAT(
      wrong.output,
      HasSubstr("names tensor 'b' in 'model-00001-of-00002.safetensors', but "
                "that shard does "
                "not hold it (it is in 'model-00002-of-00002.safetensors')"));
  // A tensor a shard holds that the index does not list.
  index(
      R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})");
  const CliRun unlisted = cli("verify " + quoted(dir.path()));
  EXPECT_EQ(unlisted.status, 1) << unlisted.output;
  EXPECT_THAT(
      unlisted.output,
      HasSubstr("holds tensor 'c', which the index "
                "model.safetensors.index.json does not list"));
}

// The layouts the library loads: a Hub folder with both formats (safetensors
// first), a folder holding one .dduf, an index named directly.
TEST(CliTest, AcceptsTheLayoutsTheLibraryLoads) {
  TempDir hub;
  StateDict sd;
  sd.insert("w", at::arange(6, at::kFloat));
  save_file(
      sd, hub / "model.safetensors", SafetensorsMetadata{{"format", "pt"}});
  torch_save(sd, hub / "pytorch_model.bin");
  for (const char* command : {"verify", "inspect"}) {
    const CliRun run = cli(std::string(command) + " " + quoted(hub.path()));
    EXPECT_EQ(run.status, 0) << command << ": " << run.output;
    EXPECT_THAT(run.output, HasSubstr("using model.safetensors")) << command;
  }
  TempDir with_dduf;
  std::filesystem::copy_file(
      torchser::testing::fixtures_dir() / "reference/dduf/tiny_pipeline.dduf",
      with_dduf / "tiny_pipeline.dduf");
  const CliRun dduf = cli("verify " + quoted(with_dduf.path()));
  EXPECT_EQ(dduf.status, 0) << dduf.output;
  EXPECT_THAT(dduf.output, HasSubstr("DDUF"));
  const auto index = torchser::testing::fixtures_dir() /
                     "reference/pickle/sharded/pytorch_model.bin.index.json";
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
  const std::size_t at =
      bytes.find(std::string("\0\0\x80\x3f", 4)); // 1.0f, the second element
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
  const auto out = nlohmann::json::parse(
      cli("inspect --json " + quoted(dir / "tied.bin")).output);
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
  save_file(
      sd, dir / "outside.safetensors", SafetensorsMetadata{{"format", "pt"}});
  std::ofstream(dir / "ckpt" / "model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"w": "../outside.safetensors"}})";
  for (const char* command : {"verify", "inspect"}) {
    const CliRun run = cli(std::string(command) + " " + quoted(dir / "ckpt"));
    EXPECT_EQ(run.status, 1) << command;
    EXPECT_THAT(
        run.output,
        HasSubstr(
            "Shard filenames must be relative paths without '..' components."))
        << command;
  }
}

TEST(CliTest, ConvertsBetweenPickleAndSafetensors) {
  TempDir dir;
  const auto source =
      torchser::testing::fixtures_dir() / "reference/pickle/sharded";
  const CliRun to_st =
      cli("convert " + quoted(source) + " " + quoted(dir / "st") +
          " --max-shard-size 0.6KB");
  ASSERT_EQ(to_st.status, 0) << to_st.output;
  EXPECT_TRUE(std::filesystem::exists(dir / "st/model.safetensors.index.json"));
  const CliRun back =
      cli("convert " + quoted(dir / "st") + " " + quoted(dir / "bin") +
          " --to pickle");
  ASSERT_EQ(back.status, 0) << back.output;
  const StateDict a =
      load_state_dict_from_file(source / "pytorch_model-00001-of-00003.bin");
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
  ASSERT_EQ(
      cli("pack " + quoted(folder) + " " + quoted(dir / "p.dduf")).status, 0);
  const CliRun unpacked =
      cli("unpack " + quoted(dir / "p.dduf") + " " + quoted(dir / "out"));
  ASSERT_EQ(unpacked.status, 0) << unpacked.output;
  EXPECT_EQ(
      torchser::testing::read_file(dir / "out/vae/config.json"), R"({"x": 1})");
  EXPECT_EQ(
      torchser::testing::read_file(dir / "out/model_index.json"),
      R"({"vae": 1})");
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
  ASSERT_EQ(
      cli("pack " + quoted(big_pipeline(dir)) + " " + quoted(dir / "p.dduf"))
          .status,
      0);
  // 64 KiB file-size limit, SIGXFSZ ignored: writes past it fail with EFBIG.
  const CliRun run = cli_with_prefix(
      "ulimit -f 64; trap '' XFSZ; ",
      "unpack " + quoted(dir / "p.dduf") + " " + quoted(dir / "out"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("File too large"));
  EXPECT_THAT(run.output, HasSubstr("diffusion_pytorch_model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(
      dir / "out/unet/diffusion_pytorch_model.safetensors"));
  for (const auto& e :
       std::filesystem::recursive_directory_iterator(dir / "out")) {
    EXPECT_EQ(
        e.path().lexically_relative(dir / "out").string().find("tmp"),
        std::string::npos)
        << "left behind: " << e.path();
  }
}

TEST(CliTest, UnpackRefusesToWriteThroughASymlinkInTheTarget) {
  TempDir dir;
  ASSERT_EQ(
      cli("pack " + quoted(big_pipeline(dir)) + " " + quoted(dir / "p.dduf"))
          .status,
      0);
  std::ofstream(dir / "victim.txt") << "precious";
  std::filesystem::create_directories(dir / "out/unet");
  std::filesystem::create_symlink(
      dir / "victim.txt", dir / "out/unet/config.json");
  const CliRun run =
      cli("unpack " + quoted(dir / "p.dduf") + " " + quoted(dir / "out"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(run.output, HasSubstr("symbolic link"));
  EXPECT_EQ(torchser::testing::read_file(dir / "victim.txt"), "precious");
  // And a symlinked folder is refused the same way.
  TempDir other;
  std::filesystem::create_directories(other / "elsewhere");
  std::filesystem::create_directory_symlink(
      other / "elsewhere", other / "unet");
  const CliRun folder =
      cli("unpack " + quoted(dir / "p.dduf") + " " + quoted(other.path()));
  EXPECT_EQ(folder.status, 1) << folder.output;
  EXPECT_TRUE(std::filesystem::is_empty(other / "elsewhere"));
}

TEST(CliTest, PackRefusesFilesDdufCannotHold) {
  TempDir dir;
  const auto folder = big_pipeline(dir);
  std::ofstream(folder / "unet/diffusion_pytorch_model.bin") << "pickle";
  const CliRun run =
      cli("pack " + quoted(folder) + " " + quoted(dir / "p.dduf"));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(
      run.output,
      HasSubstr("DDUF cannot hold unet/diffusion_pytorch_model.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir / "p.dduf"));
}

TEST(CliTest, ConvertTakesShardSizesInBytesAndLeavesNothingWhenItFails) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 4; ++i) {
    sd.insert("w" + std::to_string(i), at::arange(i, i + 100, at::kFloat));
  }
  save_file(sd, dir / "in.safetensors");
  const CliRun run =
      cli("convert " + quoted(dir / "in.safetensors") + " " +
          quoted(dir / "out") + " --max-shard-size 800 --to bin");
  ASSERT_EQ(run.status, 0) << run.output;
  EXPECT_TRUE(
      std::filesystem::exists(dir / "out/pytorch_model.bin.index.json"));
  EXPECT_TRUE(
      std::filesystem::exists(dir / "out/pytorch_model-00002-of-00002.bin"));
  const CliRun bad =
      cli("convert " + quoted(dir / "in.safetensors") + " " +
          quoted(dir / "bad") + " --max-shard-size 1oo");
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
  for (const char* command :
       {"", "inspect ", "verify ", "convert ", "pack ", "unpack "}) {
    const CliRun help = cli(std::string(command) + "--help");
    EXPECT_EQ(help.status, 0) << command;
    EXPECT_THAT(help.output, HasSubstr("Usage")) << command;
  }
  EXPECT_NE(cli("frobnicate").status, 0);
}

// ---------------------------------------------------------------------------
// Interrupted saves, convert, and the matrix of commands × inputs.

TEST(CliTest, VerifyAndInspectReportAnInterruptedSaveUntilRecover) {
  TempDir parent;
  const auto dir = parent / "ckpt";
  std::filesystem::create_directories(dir);
  StateDict sd;
  for (int i = 0; i < 4; ++i) {
    sd.insert("w" + std::to_string(i), at::arange(i, i + 100, at::kFloat));
  }
  save_torch_state_dict(sd, dir, SaveOptions().max_shard_size(800));
  std::filesystem::create_directories(parent / ".ckpt.torchser-save.Xy12Zw");
  torchser::testing::write_file(
      parent / ".ckpt.torchser-save.Xy12Zw" /
          "model-00001-of-00002.safetensors",
      "new");
  const CliRun verify = cli("verify " + quoted(dir));
  EXPECT_EQ(verify.status, 1) << verify.output;
  EXPECT_THAT(verify.output, HasSubstr("INTERRUPTED SAVE"));
  EXPECT_THAT(verify.output, HasSubstr(".ckpt.torchser-save.Xy12Zw"));
  const CliRun inspect = cli("inspect " + quoted(dir));
  EXPECT_EQ(inspect.status, 0) << inspect.output;
  EXPECT_THAT(inspect.output, HasSubstr("INTERRUPTED SAVE"));
  const CliRun as_json = cli("inspect --json " + quoted(dir));
  EXPECT_THAT(as_json.output, HasSubstr("\"interrupted_save\""));
  // A journal left after the commit point: the folder is mixed until recovery.
  torchser::testing::write_file(
      dir / ".torchser-commit.json",
      R"({"version":1,"renames":[],"remove":[]})");
  EXPECT_THAT(
      cli("verify " + quoted(dir)).output, HasSubstr("after its commit point"));
  const CliRun recover = cli("recover " + quoted(dir));
  EXPECT_EQ(recover.status, 0) << recover.output;
  EXPECT_THAT(recover.output, HasSubstr("Recovered"));
  EXPECT_FALSE(std::filesystem::exists(parent / ".ckpt.torchser-save.Xy12Zw"));
  EXPECT_FALSE(std::filesystem::exists(dir / ".torchser-commit.json"));
  const CliRun again = cli("verify " + quoted(dir));
  EXPECT_EQ(again.status, 0) << again.output;
  EXPECT_THAT(
      cli("recover " + quoted(dir)).output, HasSubstr("Nothing to recover"));
}

TEST(CliTest, VerifyChecksTheIndexTotalSize) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 4; ++i) {
    sd.insert("w" + std::to_string(i), at::arange(i, i + 100, at::kFloat));
  }
  save_torch_state_dict(
      sd,
      dir.path(),
      SaveOptions().max_shard_size(800).safe_serialization(false));
  auto index = nlohmann::json::parse(
      torchser::testing::read_file(dir / "pytorch_model.bin.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 1600);
  index["metadata"]["total_size"] = 1200;
  torchser::testing::write_file(
      dir / "pytorch_model.bin.index.json", index.dump());
  const CliRun run = cli("verify " + quoted(dir.path()));
  EXPECT_EQ(run.status, 1) << run.output;
  EXPECT_THAT(
      run.output, HasSubstr("total_size 1200, but its shards hold 1600 bytes"));
}

// Tied weights and user metadata survive every direction of convert: strict
// loads of the converted checkpoint succeed and the weights stay tied.
TEST(CliTest, ConvertKeepsMetadataAndAliasRecords) {
  TempDir dir;
  torchser::testing::TiedNet net;
  Metadata metadata;
  metadata.insert("epoch", "3");
  std::filesystem::create_directories(dir / "src");
  save_torch_model(
      net, dir / "src", SaveOptions().max_shard_size(600).metadata(metadata));
  ASSERT_TRUE(
      std::filesystem::exists(dir / "src/model.safetensors.index.json"));
  struct Case {
    std::string destination;
    std::string extra;
    bool safe;
  };
  for (const Case& c :
       {Case{"st-sharded", "--max-shard-size 500", true},
        Case{"one.safetensors", "", true},
        Case{"bin-sharded", "--to bin --max-shard-size 500", false},
        Case{"one.bin", "", false}}) {
    const CliRun run =
        cli("convert " + quoted(dir / "src") + " " +
            quoted(dir / c.destination) + " " + c.extra);
    ASSERT_EQ(run.status, 0) << c.destination << ": " << run.output;
    torchser::testing::TiedNet loaded;
    const auto target = dir / c.destination;
    EXPECT_NO_THROW(load_torch_model(
        loaded, target, LoadOptions().strict(true).safe(c.safe)))
        << c.destination;
    EXPECT_TRUE(loaded.head->weight.equal(net.head->weight)) << c.destination;
    EXPECT_EQ(loaded.head->weight.data_ptr(), loaded.embed->weight.data_ptr())
        << c.destination;
    const CliRun inspect = cli("inspect " + quoted(target));
    if (c.destination == "one.bin") {
      EXPECT_THAT(run.output, HasSubstr("not kept: epoch"))
          << run.output; // torch.save has no metadata
    } else {
      EXPECT_THAT(inspect.output, HasSubstr("metadata epoch = 3"))
          << c.destination << ": " << inspect.output;
    }
  }
  // And back: a .bin with shared storage becomes safetensors with an alias
  // record.
  const CliRun back =
      cli("convert " + quoted(dir / "one.bin") + " " +
          quoted(dir / "back.safetensors"));
  ASSERT_EQ(back.status, 0) << back.output;
  torchser::testing::TiedNet reloaded;
  EXPECT_NO_THROW(load_torch_model(
      reloaded, dir / "back.safetensors", LoadOptions().strict(true)));
  EXPECT_EQ(
      reloaded.head->weight.data_ptr(), reloaded.embed->weight.data_ptr());
}

// Converting a checkpoint in place (DST is SRC's folder, or a file in it)
// replaces it, and never waits on its own read lock.
TEST(CliTest, ConvertInPlaceReplacesTheCheckpoint) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 4; ++i) {
    sd.insert("w" + std::to_string(i), at::arange(i, i + 100, at::kFloat));
  }
  save_torch_state_dict(sd, dir.path(), SaveOptions().max_shard_size(800));
  const CliRun same = cli_with_prefix(
      "timeout 60 ",
      "convert " + quoted(dir.path()) + " " + quoted(dir.path()) +
          " --max-shard-size 400");
  ASSERT_EQ(same.status, 0) << same.output;
  EXPECT_TRUE(
      std::filesystem::exists(dir / "model-00004-of-00004.safetensors"));
  // One file named like the checkpoint's own: the shards and index go.
  const CliRun single = cli_with_prefix(
      "timeout 60 ",
      "convert " + quoted(dir.path()) + " " +
          quoted(dir / "model.safetensors"));
  ASSERT_EQ(single.status, 0) << single.output;
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"model.safetensors"});
  EXPECT_TRUE(load_file(dir / "model.safetensors")["w3"].equal(sd["w3"]));
}

TEST(CliTest, ConvertWritesAFileWhenTheDestinationHasAFormatExtension) {
  TempDir dir;
  StateDict sd;
  sd.insert("w", at::arange(10, at::kFloat));
  torch_save(sd, dir / "in.bin");
  const CliRun run =
      cli("convert " + quoted(dir / "in.bin") + " " +
          quoted(dir / "out.safetensors"));
  ASSERT_EQ(run.status, 0) << run.output;
  EXPECT_TRUE(std::filesystem::is_regular_file(dir / "out.safetensors"));
  EXPECT_TRUE(load_file(dir / "out.safetensors")["w"].equal(sd["w"]));
  const CliRun contradiction =
      cli("convert " + quoted(dir / "in.bin") + " " +
          quoted(dir / "x.safetensors") + " --to pickle");
  EXPECT_EQ(contradiction.status, 2) << contradiction.output;
  EXPECT_THAT(contradiction.output, HasSubstr("contradicts"));
  const CliRun nowhere =
      cli("convert " + quoted(dir / "in.bin") + " " +
          quoted(dir / "no/such/out.bin"));
  EXPECT_EQ(nowhere.status, 1) << nowhere.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "no"));
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"in.bin", "out.safetensors"}));
}

// The peak resident memory of `command` run by sh in a fresh child (the
// child's RUSAGE_CHILDREN sees only this command), in KiB.
long max_rss_kib(const std::string& command) {
  int fds[2];
  EXPECT_EQ(::pipe(fds), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    const int rc = std::system((command + " >/dev/null 2>&1").c_str());
    struct rusage usage {};
    ::getrusage(RUSAGE_CHILDREN, &usage);
    const long value = rc == 0 ? usage.ru_maxrss : -1;
    (void)!::write(fds[1], &value, sizeof value);
    ::_exit(0);
  }
  ::close(fds[1]);
  long value = -1;
  (void)!::read(fds[0], &value, sizeof value);
  ::close(fds[0]);
  ::waitpid(child, nullptr, 0);
  return value;
}

// convert streams: each source tensor's pages are dropped once written, so
// resident memory grows by about a tensor, not by the checkpoint.
TEST(CliTest, ConvertStreamsWithResidentMemoryNearOneTensor) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 32; ++i) {
    sd.insert(
        "w" + std::to_string(i),
        at::full({1 << 20}, static_cast<float>(i))); // 4 MiB each, 128 MiB
  }
  save_file(sd, dir / "big.safetensors", SafetensorsMetadata{{"format", "pt"}});
  torch_save(sd, dir / "big.bin");
  sd = StateDict();
  const std::string cli_path = quoted(TORCHSER_CLI);
  for (const char* source : {"big.safetensors", "big.bin"}) {
    const long idle =
        max_rss_kib(cli_path + " inspect " + quoted(dir / source));
    const std::string out =
        std::string(source) == "big.bin" ? "out.safetensors" : "out.bin";
    const long converting = max_rss_kib(
        cli_path + " convert " + quoted(dir / source) + " " +
        quoted(dir / out) + " --to " +
        (out == "out.bin" ? "bin" : "safetensors"));
    ASSERT_GT(idle, 0) << source;
    ASSERT_GT(converting, 0) << source;
    std::cout << "[convert] " << source << ": peak RSS " << converting / 1024
              << " MiB, inspect " << idle / 1024
              << " MiB, checkpoint 128 MiB\n";
    EXPECT_LT(converting - idle, 48 * 1024)
        << source << ": resident memory grew with the checkpoint";
  }
}

// Every command on every kind of input, as a user types them (names with
// spaces and non-ASCII characters), with the exit status and what it says.
TEST(CliTest, EveryCommandOnEveryKindOfInput) {
  TempDir root;
  const auto base = root / "dir with spaces ünï";
  std::filesystem::create_directories(base);
  StateDict sd;
  for (int i = 0; i < 4; ++i) {
    sd.insert(
        "layer " + std::to_string(i) + ".wéight",
        at::arange(i, i + 100, at::kFloat));
  }
  const auto make_dir = [&](const std::string& name) {
    std::filesystem::create_directories(base / name);
    return base / name;
  };
  save_file(
      sd, base / "single ü.safetensors", SafetensorsMetadata{{"format", "pt"}});
  save_torch_state_dict(
      sd, make_dir("st sharded"), SaveOptions().max_shard_size(800));
  torch_save(sd, base / "single ü.bin");
  save_torch_state_dict(
      sd,
      make_dir("bin sharded"),
      SaveOptions().max_shard_size(800).safe_serialization(false));
  save_torch_model(torchser::testing::TiedNet(), make_dir("tied"));
  {
    const auto both = make_dir("hub both");
    save_file(
        sd, both / "model.safetensors", SafetensorsMetadata{{"format", "pt"}});
    torch_save(sd, both / "pytorch_model.bin");
  }
  {
    const auto folder = make_dir("pipeline");
    std::filesystem::create_directories(folder / "unet");
    torchser::testing::write_file(
        folder / "model_index.json",
        R"({"_class_name": "P", "unet": ["diffusers", "UNet"]})");
    torchser::testing::write_file(folder / "unet" / "config.json", "{}");
    save_file(sd, folder / "unet" / "model.safetensors");
    export_folder_as_dduf(base / "pipe ü.dduf", folder);
  }
  {
    const auto dir = make_dir("interrupted");
    save_torch_state_dict(sd, dir, SaveOptions().max_shard_size(800));
    torchser::testing::write_file(
        dir / ".torchser-commit.json",
        R"({"version":1,"renames":[],"remove":[]})");
  }
  {
    const auto dir = make_dir("missing shard");
    save_torch_state_dict(sd, dir, SaveOptions().max_shard_size(800));
    std::filesystem::remove(dir / "model-00002-of-00002.safetensors");
  }
  {
    const std::string bytes =
        torchser::testing::read_file(base / "single ü.safetensors");
    torchser::testing::write_file(
        base / "truncated.safetensors", bytes.substr(0, bytes.size() - 7));
  }
  torch_save(sd, base / "wrong extension.safetensors");

  struct Expect {
    std::string input;
    int inspect;
    int verify;
    int convert;
    std::string says; // in what inspect prints, and in every failure
  };
  const std::vector<Expect> table = {
      {"single ü.safetensors", 0, 0, 0, "layer 0.wéight"},
      {"st sharded", 0, 0, 0, "layer 3.wéight"},
      {"single ü.bin", 0, 0, 0, "layer 1.wéight"},
      {"bin sharded", 0, 0, 0, "layer 2.wéight"},
      {"tied", 0, 0, 0, ""},
      {"hub both", 0, 0, 0, "using model.safetensors"},
      {"pipe ü.dduf", 0, 0, 1, ""},
      {"interrupted", 0, 1, 0, ""},
      {"missing shard", 1, 1, 1, "model-00002-of-00002.safetensors"},
      {"truncated.safetensors", 1, 1, 1, "truncated.safetensors"},
      {"wrong extension.safetensors", 0, 0, 0, "despite its name"},
  };
  int n = 0;
  for (const Expect& e : table) {
    const auto input = base / e.input;
    const std::vector<std::pair<std::string, int>> runs = {
        {"inspect " + quoted(input), e.inspect},
        {"inspect --json " + quoted(input), e.inspect},
        {"verify " + quoted(input), e.verify},
        {"convert " + quoted(input) + " " +
             quoted(root / ("out dir " + std::to_string(n))),
         e.convert},
        {"convert " + quoted(input) + " " +
             quoted(root / ("out file " + std::to_string(n) + ".bin")),
         e.convert},
    };
    for (const auto& [arguments, status] : runs) {
      const CliRun run = cli(arguments);
      EXPECT_EQ(run.status, status) << arguments << ":\n" << run.output;
      if (!e.says.empty() &&
          (arguments.rfind("inspect", 0) == 0 || status != 0)) {
        EXPECT_THAT(run.output, HasSubstr(e.says)) << arguments;
      }
      if (status != 0) {
        EXPECT_FALSE(run.output.empty())
            << arguments; // a failure always says why
      }
    }
    if (e.input == "interrupted") { // convert read it as load_torch_model does:
                                    // completed first
      EXPECT_FALSE(std::filesystem::exists(input / ".torchser-commit.json"));
    }
    ++n;
  }
}

// A torch.save file holding more than one state dict: inspect says which it
// shows and what it leaves out; convert refuses to drop tensors unasked.
TEST(CliTest, ACheckpointWithSeveralStateDictsIsNeverCutSilently) {
  if (!torchser::testing::python_has_torch()) {
    GTEST_SKIP() << "the Python in use has no torch";
  }
  TempDir dir;
  torchser::testing::write_file(
      dir / "make.py",
      "import torch, sys\nd = sys.argv[1]\n"
      "torch.save({'generator': {'g.w': torch.ones(2)}, 'discriminator': "
      "{'d.w': "
      "torch.zeros(3)}, 'step': 10}, d + '/gan.pt')\n"
      "torch.save({'model': {'w': torch.ones(2)}, 'epoch': 3}, d + "
      "'/train.pt')\n");
  torchser::testing::run_python(
      quoted(dir / "make.py") + " " + quoted(dir.path()));
  const CliRun inspect = cli("inspect " + quoted(dir / "gan.pt"));
  EXPECT_EQ(inspect.status, 0) << inspect.output;
  EXPECT_THAT(
      inspect.output,
      HasSubstr("state dict taken from key 'generator'; ignored: "
                "discriminator, step"));
  const CliRun refused =
      cli("convert " + quoted(dir / "gan.pt") + " " + quoted(dir / "out"));
  EXPECT_EQ(refused.status, 1) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("--key"));
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
  const CliRun chosen =
      cli("convert " + quoted(dir / "gan.pt") + " " +
          quoted(dir / "d.safetensors") + " --key discriminator");
  ASSERT_EQ(chosen.status, 0) << chosen.output;
  EXPECT_TRUE(load_file(dir / "d.safetensors")["d.w"].equal(at::zeros({3})));
  // The usual training checkpoint: the choice is unambiguous, and said.
  const CliRun usual =
      cli("convert " + quoted(dir / "train.pt") + " " +
          quoted(dir / "t.safetensors"));
  ASSERT_EQ(usual.status, 0) << usual.output;
  EXPECT_THAT(
      usual.output,
      HasSubstr("state dict taken from key 'model'; ignored: epoch"));
}

} // namespace
} // namespace torchser

namespace torchser {
namespace {

// A DataParallel checkpoint becomes a Hub one: names stripped and renamed,
// floats in bf16, one block only, with the alias records following.
TEST(CliTest, ConvertRenamesCastsAndSelectsTensors) {
  TempDir dir;
  torchser::testing::TiedNet net;
  StateDict prefixed;
  for (const auto& item : state_dict(net)) {
    prefixed.insert("module." + item.key(), item.value());
  }
  std::filesystem::create_directories(dir / "src");
  save_torch_state_dict(
      prefixed, dir / "src", SaveOptions().safe_serialization(false));
  const CliRun run =
      cli("convert " + quoted(dir / "src") + " " + quoted(dir / "out") +
          " --strip-prefix module. --rename '^blocks\\.(\\d+)\\.=layers.\\1.'"
          " --dtype bf16");
  ASSERT_EQ(run.status, 0) << run.output;
  const StateDict out =
      load_state_dict_from_file(dir / "out/model.safetensors");
  EXPECT_TRUE(out.contains("layers.1.weight"));
  EXPECT_FALSE(out.contains("module.embed.weight"));
  EXPECT_EQ(out["layers.1.weight"].scalar_type(), at::kBFloat16);
  EXPECT_EQ(out["norm.num_batches_tracked"].scalar_type(), at::kLong);
  EXPECT_TRUE(out["layers.1.weight"].equal(
      net.blocks->ptr<torch::nn::LinearImpl>(1)->weight.to(at::kBFloat16)));
  // The tied head is an alias record under the new names.
  torchser::testing::TiedNet loaded;
  loaded.to(at::kBFloat16);
  loaded.head->weight.set_data(loaded.embed->weight);
  const LoadResult result = load_torch_model(
      loaded,
      dir / "out",
      LoadOptions().strict(true).key_mapping(
          KeyMapping().rename("^layers\\.", "blocks.")));
  EXPECT_TRUE(result.missing_keys.empty());

  const CliRun one =
      cli("convert " + quoted(dir / "src") + " " + quoted(dir / "b1.bin") +
          " --only-prefix module.blocks.1. --strip-prefix module.blocks.1.");
  ASSERT_EQ(one.status, 0) << one.output;
  std::vector<std::string> keys =
      load_state_dict_from_file(dir / "b1.bin").keys();
  std::sort(keys.begin(), keys.end());
  EXPECT_EQ(keys, (std::vector<std::string>{"bias", "weight"}));
}

TEST(CliTest, ConvertOptionsThatCannotWorkSayWhy) {
  TempDir dir;
  save_torch_state_dict(
      StateDict{{"enc.w", at::ones({2})}, {"dec.w", at::ones({2})}},
      dir.path());
  const std::string src = quoted(dir / "model.safetensors");
  const CliRun dtype =
      cli("convert " + src + " " + quoted(dir / "o") + " --dtype int8");
  EXPECT_EQ(dtype.status, 2) << dtype.output;
  EXPECT_THAT(dtype.output, HasSubstr("--dtype int8"));
  const CliRun rename =
      cli("convert " + src + " " + quoted(dir / "o") + " --rename nothing");
  EXPECT_EQ(rename.status, 2) << rename.output;
  const CliRun merge =
      cli("convert " + src + " " + quoted(dir / "o") +
          " --rename '^(enc|dec)\\.='");
  EXPECT_EQ(merge.status, 1) << merge.output;
  EXPECT_THAT(merge.output, HasSubstr("'dec.w' and 'enc.w'"));
  const CliRun none =
      cli("convert " + src + " " + quoted(dir / "o") + " --only-prefix x.");
  EXPECT_EQ(none.status, 1) << none.output;
  EXPECT_THAT(none.output, HasSubstr("--only-prefix"));
  EXPECT_FALSE(std::filesystem::exists(dir / "o"));
}

} // namespace
} // namespace torchser
