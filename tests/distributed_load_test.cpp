// Resharding on load, tested as users run it: one process per rank on
// 127.0.0.1 (dist_worker --load), each filling zeroed copies of its pieces
// from a checkpoint saved by another world size (or one process, or the
// .bin writer), then comparing them with the pieces it should hold.

#include <signal.h>

#include <chrono>
#include <filesystem>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/ops/arange.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <nlohmann/json.hpp>

#include <torchser/distributed_load.h>
#include <torchser/key_mapping.h>
#include <torchser/process_group.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "dist_harness.h"
#include "dist_scenarios.h"
#include "test_utils.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

using torchser::testing::describe_runs;
using torchser::testing::RankRun;
using torchser::testing::run_ranks;

struct Loaded {
  std::uint64_t bytes_read = 0; // torchser's count
  std::uint64_t rchar = 0;      // the kernel's
  std::uint64_t piece_bytes = 0;
  std::uint64_t received = 0; // over the group (read_once)
};

Loaded loaded_of(const RankRun& run) {
  Loaded out;
  const auto at = run.output.find(" loaded ");
  EXPECT_NE(at, std::string::npos) << run.output;
  if (at != std::string::npos) {
    std::istringstream in(run.output.substr(at + 8));
    in >> out.bytes_read >> out.rchar >> out.piece_bytes;
  }
  const auto received = run.output.find(" received ");
  if (received != std::string::npos) {
    out.received = std::stoull(run.output.substr(received + 10));
  }
  return out;
}

// A read-once load's ranks: each succeeded, and each piece's bytes were
// read or received; returns the bytes the group read in all.
std::uint64_t read_once_total(const std::vector<RankRun>& runs) {
  std::uint64_t total = 0;
  for (const RankRun& run : runs) {
    [&] { ASSERT_EQ(run.status, 0) << describe_runs(runs); }();
    if (::testing::Test::HasFatalFailure()) {
      return total;
    }
    const Loaded l = loaded_of(run);
    EXPECT_EQ(l.bytes_read + l.received, l.piece_bytes) << run.output;
    total += l.bytes_read;
  }
  return total;
}

class DistributedLoadTest : public ::testing::Test {
 protected:
  fs::path dir(const std::string& name) {
    fs::create_directories(temp_ / name);
    return temp_.path() / name;
  }
  // Saves `scenario` with `world` ranks (0: one process) into a new folder.
  fs::path saved(
      const std::string& scenario,
      int world,
      const std::vector<std::string>& args) {
    const fs::path out =
        dir("saved-" + scenario + "-" + std::to_string(world) + "-" +
            std::to_string(counter_++));
    if (world == 0) {
      torchser::SaveOptions options;
      for (std::size_t i = 0; i < args.size(); ++i) {
        if (args[i] == "--max-shard-size") {
          options.max_shard_size(torchser::testing::shard_size(args[++i]));
        } else if (args[i] == "--bin") {
          options.safe_serialization(false);
        }
      }
      torchser::save_torch_state_dict(
          torchser::testing::make_scenario(scenario, 0, 1).full, out, options);
      return out;
    }
    const auto runs =
        run_ranks(scenario, out, world, [&](int) { return args; });
    for (const RankRun& run : runs) {
      EXPECT_EQ(run.status, 0) << describe_runs(runs);
    }
    return out;
  }
  torchser::testing::TempDir temp_;
  int counter_ = 0;
};

TEST_F(
    DistributedLoadTest,
    EveryWorldSizeLoadsWhatAnyWorldSizeSavedIntoItsPieces) {
  for (const bool bin : {false, true}) {
    for (const int saver : {0, 1, 2, 3, 4}) {
      std::vector<std::string> args = {"--max-shard-size", "600"};
      if (bin) {
        args.push_back("--bin");
      }
      const fs::path checkpoint = saved("mixed", saver, args);
      // Each saver against two loader sizes, every pair covered over the
      // loop (the 1–4 × 1–4 grid, with a one-process save as world 0).
      for (const int loader : {1 + saver % 4, 1 + (saver + 2) % 4}) {
        SCOPED_TRACE(
            std::string(bin ? ".bin" : "safetensors") + ", saved by " +
            std::to_string(saver) + ", loaded by " + std::to_string(loader));
        std::vector<std::string> load_args = {"--load", "--strict"};
        if (bin) {
          load_args.push_back("--bin");
        }
        const auto runs = run_ranks(
            "mixed", checkpoint, loader, [&](int) { return load_args; });
        for (const RankRun& run : runs) {
          ASSERT_EQ(run.status, 0) << describe_runs(runs);
          EXPECT_THAT(run.output, HasSubstr("missing 0 unexpected 0"));
          const Loaded l = loaded_of(run);
          // Every piece's bytes once (tied pieces once), nothing more.
          EXPECT_EQ(l.bytes_read, l.piece_bytes) << run.output;
        }
      }
    }
  }
}

// The cold-cache reader in a resharding load: each rank's runs through
// O_DIRECT reads (whole 4 KiB blocks, touching runs merged), into the same
// values, both formats, saved and loaded by different world sizes.
TEST_F(DistributedLoadTest, TheColdReaderFillsEveryRanksPieces) {
  for (const bool bin : {false, true}) {
    std::vector<std::string> args = {"--max-shard-size", "600"};
    if (bin) {
      args.push_back("--bin");
    }
    const fs::path checkpoint = saved("mixed", 2, args);
    for (const int loader : {1, 3}) {
      SCOPED_TRACE(
          std::string(bin ? ".bin" : "safetensors") + ", loaded by " +
          std::to_string(loader));
      std::vector<std::string> load_args = {"--load", "--strict", "--direct"};
      if (bin) {
        load_args.push_back("--bin");
      }
      const auto runs = run_ranks(
          "mixed", checkpoint, loader, [&](int) { return load_args; });
      for (const RankRun& run : runs) {
        ASSERT_EQ(run.status, 0) << describe_runs(runs);
        const Loaded l = loaded_of(run);
        EXPECT_EQ(l.bytes_read, l.piece_bytes) << run.output;
      }
    }
  }
  const fs::path big = saved("big", 0, {"--max-shard-size", "2MB"});
  const auto runs = run_ranks("big", big, 2, [&](int) {
    return std::vector<std::string>{"--load", "--strict", "--direct"};
  });
  for (const RankRun& run : runs) {
    ASSERT_EQ(run.status, 0) << describe_runs(runs);
  }
}

// The kernel's count of bytes each rank read (rchar: every read and pread,
// the collectives' socket reads and the headers included) against its
// share: its row and column pieces and the replicated tensor.
TEST_F(DistributedLoadTest, EachRankReadsOnlyItsShareOfTheCheckpoint) {
  for (const int loader : {2, 3, 4}) {
    SCOPED_TRACE("loaded by " + std::to_string(loader));
    const fs::path checkpoint = saved("big", 0, {"--max-shard-size", "2MB"});
    const auto runs = run_ranks("big", checkpoint, loader, [&](int) {
      return std::vector<std::string>{"--load", "--strict"};
    });
    std::uint64_t total = 0;
    for (const RankRun& run : runs) {
      ASSERT_EQ(run.status, 0) << describe_runs(runs);
      const Loaded l = loaded_of(run);
      EXPECT_EQ(l.bytes_read, l.piece_bytes);
      EXPECT_LE(l.rchar, l.piece_bytes * 101 / 100) << run.output;
      EXPECT_GE(l.rchar, l.piece_bytes) << run.output;
      total += l.bytes_read;
    }
    // Three split tensors once in all, the replicated one on every rank.
    EXPECT_EQ(total, (3 + loader) * std::uint64_t{1} << 20);
  }
}

// Files written by PyTorch 2.13's DCP consolidation (the fixture), loaded
// into DTensor-like pieces by 1–3 ranks.
TEST_F(DistributedLoadTest, ACheckpointPyTorchWroteLoadsIntoEveryWorldSize) {
  const fs::path fixture = fs::path(TORCHSER_FIXTURES_DIR) / "dcp" / "world2";
  for (const int loader : {1, 2, 3}) {
    SCOPED_TRACE("loaded by " + std::to_string(loader));
    const auto runs = run_ranks("dcp-fixture", fixture, loader, [&](int) {
      return std::vector<std::string>{"--load", "--strict"};
    });
    for (const RankRun& run : runs) {
      ASSERT_EQ(run.status, 0) << describe_runs(runs);
      const Loaded l = loaded_of(run);
      EXPECT_EQ(l.bytes_read, l.piece_bytes);
    }
  }
}

// PyTorch DCP's own sharded layout (each writing rank's
// shard-R-model-K-of-N.safetensors files, pieces placed by
// DCP_SHARDING_INFO), loaded as it is: each rank reads only where its
// pieces overlap the stored ones, whatever the world size that wrote it.
TEST_F(DistributedLoadTest, DcpsShardedLayoutLoadsIntoEveryWorldSize) {
  const fs::path sharded =
      fs::path(TORCHSER_FIXTURES_DIR) / "dcp" / "world2" / "sharded";
  for (const bool direct : {false, true}) {
    for (const int loader : {1, 2, 3, 4}) {
      SCOPED_TRACE(
          std::string(direct ? "kDirect" : "pread") + ", loaded by " +
          std::to_string(loader));
      const auto runs = run_ranks("dcp-fixture", sharded, loader, [&](int) {
        std::vector<std::string> args = {"--load", "--strict"};
        if (direct) {
          args.push_back("--direct");
        }
        return args;
      });
      for (const RankRun& run : runs) {
        ASSERT_EQ(run.status, 0) << describe_runs(runs);
        EXPECT_THAT(run.output, HasSubstr("missing 0 unexpected 0"));
        const Loaded l = loaded_of(run);
        EXPECT_EQ(l.bytes_read, l.piece_bytes) << run.output;
      }
    }
  }
  // Read once: the replicated tensor by one rank, so the group reads the
  // checkpoint's bytes once in all.
  const auto runs = run_ranks("dcp-fixture", sharded, 3, [&](int) {
    return std::vector<std::string>{"--load", "--read-once", "on"};
  });
  std::uint64_t total = 0;
  ASSERT_NO_FATAL_FAILURE(total = read_once_total(runs));
  const auto full = torchser::testing::make_scenario("dcp-fixture", 0, 1).full;
  std::uint64_t checkpoint_bytes = 0;
  for (const auto& item : full) {
    checkpoint_bytes += item.value().nbytes();
  }
  EXPECT_EQ(total, checkpoint_bytes) << describe_runs(runs);
}

// DCP's layout with the load's options and conversions, on a one-rank
// group in this process: a shard file written as DCP writes one (its pieces'
// saved_offsets in DCP_SHARDING_INFO), a local block that overlaps pieces of
// two files, held transposed in another dtype; renamed keys, an ignored
// one, a tensor with an empty piece.
TEST_F(DistributedLoadTest, DcpsLayoutTakesTheLoadOptionsAndConvertsPieces) {
  const fs::path layout = dir("dcp-written");
  const at::Tensor w = at::arange(24, at::kFloat).view({4, 6});
  const at::Tensor b = at::arange(5, at::kFloat) * 10;
  const at::Tensor e = at::arange(6, at::kFloat).view({3, 2}) * 100;
  const auto shard =
      [&](int rank,
          const std::vector<
              std::tuple<std::string, at::Tensor, std::vector<std::int64_t>>>&
              pieces) {
        torchser::StateDict sd;
        nlohmann::json info = nlohmann::json::object();
        for (const auto& [name, piece, offsets] : pieces) {
          sd.insert(name, piece.contiguous());
          info[name] = {{"saved_offsets", offsets}};
        }
        torchser::save_file(
            sd,
            layout / ("shard-0000" + std::to_string(rank) +
                      "-model-00001-of-00001.safetensors"),
            torchser::SafetensorsMetadata{
                {"format", "pt"}, {"DCP_SHARDING_INFO", info.dump()}});
      };
  shard(
      1,
      {{"w", w.narrow(0, 0, 2), {0, 0}},
       {"b", b, {0}},
       {"e", e, {0, 0}},
       {"skip", at::ones({2}), {0}}});
  shard(
      2, {{"w", w.narrow(0, 2, 2), {2, 0}}, {"e", e.narrow(0, 3, 0), {3, 0}}});

  const torchser::ProcessGroup group = torchser::init_process_group(
      torchser::ProcessGroupOptions()
          .init_method("file://" + (dir("store") / "store").string())
          .rank(0)
          .world_size(1)
          .hostname("127.0.0.1")
          .timeout(std::chrono::seconds(20)));
  for (const auto backend :
       {torchser::LoadBackend::kMmap, torchser::LoadBackend::kDirect}) {
    torchser::DistributedStateDict sd;
    // Rows 1-3, columns 2-4: pieces of both files, float64, transposed.
    const at::Tensor block = at::zeros({3, 3}, at::kDouble).t();
    sd.insert("model.w", {block, torchser::Placement::block({4, 6}, {1, 2})});
    sd.insert(
        "model.b",
        {at::zeros({5}, at::kFloat), torchser::Placement::replicate()});
    sd.insert(
        "model.e",
        {at::zeros({3, 2}, at::kFloat), torchser::Placement::replicate()});
    const auto result = torchser::load_torch_state_dict(
        sd,
        fs::path(layout),
        group,
        torchser::LoadOptions()
            .strict(true)
            .backend(backend)
            .key_mapping(torchser::KeyMapping().add_prefix("model."))
            .ignore_keys({"^model\\.skip$"}));
    EXPECT_TRUE(sd["model.w"].local.equal(
        w.narrow(0, 1, 3).narrow(1, 2, 3).to(at::kDouble)));
    EXPECT_TRUE(sd["model.b"].local.equal(b));
    EXPECT_TRUE(sd["model.e"].local.equal(e));
    EXPECT_EQ(result.bytes_read, (9 + 5 + 6) * 4U);
    EXPECT_TRUE(result.missing_keys.empty());
    EXPECT_TRUE(result.unexpected_keys.empty());
  }
  // A shape that is not the pieces' full shape: PyTorch's message, naming
  // the layout's folder.
  torchser::DistributedStateDict wrong;
  wrong.insert(
      "model.w",
      {at::zeros({5, 6}, at::kFloat), torchser::Placement::replicate()});
  EXPECT_THAT(
      [&] {
        torchser::load_torch_state_dict(
            wrong,
            layout,
            group,
            torchser::LoadOptions().key_mapping(
                torchser::KeyMapping().add_prefix("model.")));
      },
      ::testing::ThrowsMessage<torchser::RuntimeError>(::testing::AllOf(
          HasSubstr("size mismatch for model.w"), HasSubstr(layout.string()))));
}

TEST_F(DistributedLoadTest, ABrokenDcpLayoutFailsOnEveryRankNamingTheFiles) {
  const fs::path source =
      fs::path(TORCHSER_FIXTURES_DIR) / "dcp" / "world2" / "sharded";
  // The first rank's files gone: a hole in every split tensor.
  const fs::path missing = dir("missing-rank");
  fs::copy(source, missing);
  fs::remove(missing / "shard-00001-model-00001-of-00002.safetensors");
  fs::remove(missing / "shard-00001-model-00002-of-00002.safetensors");
  auto runs = run_ranks("dcp-fixture", missing, 2, [&](int) {
    return std::vector<std::string>{"--load"};
  });
  for (const RankRun& run : runs) {
    EXPECT_EQ(run.status, 3) << describe_runs(runs);
    EXPECT_THAT(run.output, HasSubstr("none of shard 1")) << run.output;
  }
  // A shard file cut short: the format's error, naming it.
  const fs::path truncated = dir("truncated");
  fs::copy(source, truncated);
  fs::resize_file(
      truncated / "shard-00002-model-00001-of-00002.safetensors", 100);
  runs = run_ranks("dcp-fixture", truncated, 2, [&](int) {
    return std::vector<std::string>{"--load"};
  });
  for (const RankRun& run : runs) {
    EXPECT_EQ(run.status, 3) << describe_runs(runs);
    EXPECT_THAT(
        run.output, HasSubstr("shard-00002-model-00001-of-00002.safetensors"))
        << run.output;
  }
}

// read_once: each tensor several ranks need whole is read by one of them
// and broadcast, so the group reads the checkpoint once in all.
TEST_F(
    DistributedLoadTest, ReadOnceReadsEachByteOnceInAllAndBroadcastsTheRest) {
  const fs::path big = saved("big", 0, {"--max-shard-size", "2MB"});
  for (const int loader : {2, 3, 4}) {
    SCOPED_TRACE("big, loaded by " + std::to_string(loader));
    const auto runs = run_ranks("big", big, loader, [&](int) {
      return std::vector<std::string>{
          "--load", "--strict", "--read-once", "on"};
    });
    std::uint64_t total = 0;
    ASSERT_NO_FATAL_FAILURE(total = read_once_total(runs));
    // The four 1 MiB tensors, once.
    EXPECT_EQ(total, std::uint64_t{4} << 20) << describe_runs(runs);
  }
  // A rank holding only rows of a tensor the others share whole reads its
  // rows itself.
  {
    const auto runs = run_ranks("big-partial", big, 3, [&](int) {
      return std::vector<std::string>{
          "--load", "--strict", "--read-once", "on"};
    });
    for (const RankRun& run : runs) {
      ASSERT_EQ(run.status, 0) << describe_runs(runs);
      const Loaded l = loaded_of(run);
      EXPECT_EQ(l.bytes_read + l.received, l.piece_bytes) << run.output;
    }
  }
  // Every kind of piece, dtype, tie and layout, read once where shared.
  const fs::path mixed = saved("mixed", 3, {"--max-shard-size", "600"});
  for (const int loader : {2, 4}) {
    SCOPED_TRACE("mixed, loaded by " + std::to_string(loader));
    const auto runs = run_ranks("mixed", mixed, loader, [&](int) {
      return std::vector<std::string>{
          "--load", "--strict", "--read-once", "on"};
    });
    std::uint64_t received = 0;
    for (const RankRun& run : runs) {
      ASSERT_EQ(run.status, 0) << describe_runs(runs);
      received += loaded_of(run).received;
    }
    EXPECT_GT(received, 0U);
  }
}

TEST_F(DistributedLoadTest, StrictLoadsFailOnEveryRankNamingTheKeys) {
  // A checkpoint of "big" lacks every "mixed" name, and holds names no
  // "mixed" rank has.
  const fs::path checkpoint = saved("big", 0, {});
  const auto runs = run_ranks("mixed", checkpoint, 2, [&](int) {
    return std::vector<std::string>{"--load", "--strict"};
  });
  ASSERT_EQ(runs.size(), 2U);
  EXPECT_EQ(runs[0].status, 3) << describe_runs(runs);
  EXPECT_EQ(runs[1].status, 3) << describe_runs(runs);
  EXPECT_THAT(runs[0].output, HasSubstr("RuntimeError"));
  EXPECT_THAT(
      runs[0].output,
      HasSubstr("Error(s) in loading state_dict on rank 0 from"));
  EXPECT_THAT(
      runs[0].output,
      HasSubstr("Missing key(s) in state_dict: \"embed.weight\""));
  EXPECT_THAT(
      runs[0].output,
      HasSubstr("Unexpected key(s) in state_dict (held by no rank): "
                "\"big.columns\""));
  // Without strict the load goes on and reports them.
  const auto lenient = run_ranks("mixed", checkpoint, 2, [&](int) {
    return std::vector<std::string>{"--load"};
  });
  for (const RankRun& run : lenient) {
    // Nothing was loaded, so the pieces differ from the expected ones.
    EXPECT_EQ(run.status, 4) << describe_runs(lenient);
    EXPECT_THAT(run.output, HasSubstr("unexpected 4"));
  }
}

TEST_F(DistributedLoadTest, ShapeMismatchesFailOnEveryRankNamingTensorAndRank) {
  // "bad-shape" places the last rank's rows in a tensor of 24 rows; the
  // checkpoint's has 23.
  const fs::path checkpoint = saved("mixed", 0, {});
  const auto runs = run_ranks("bad-shape", checkpoint, 3, [&](int) {
    return std::vector<std::string>{"--load"};
  });
  for (const RankRun& run : runs) {
    EXPECT_EQ(run.status, 3) << describe_runs(runs);
  }
  EXPECT_THAT(
      runs[2].output,
      HasSubstr("size mismatch for layers.0.up.weight: copying a param with "
                "shape torch.Size([23, 16]) from checkpoint"));
  EXPECT_THAT(runs[2].output, HasSubstr("torch.Size([24, 16])"));
  EXPECT_THAT(runs[2].output, HasSubstr("on rank 2"));
  EXPECT_THAT(runs[0].output, HasSubstr("DistError"));
  EXPECT_THAT(runs[0].output, HasSubstr("rank 2 failed"));
}

TEST_F(DistributedLoadTest, ARankThatDiesOrHangsMidLoadFailsTheOthersInTime) {
  const fs::path checkpoint = saved("mixed", 0, {"--max-shard-size", "600"});
  // Killed after its 3rd piece: the others see the dead peer by themselves.
  const auto killed = run_ranks("mixed", checkpoint, 3, [&](int r) {
    std::vector<std::string> args = {"--load", "--timeout-ms", "60000"};
    if (r == 1) {
      args.insert(args.end(), {"--kill-after", "3"});
    }
    return args;
  });
  EXPECT_EQ(killed[1].status, -SIGKILL) << describe_runs(killed);
  for (const int r : {0, 2}) {
    EXPECT_FALSE(killed[r].killed_by_harness) << describe_runs(killed);
    EXPECT_EQ(killed[r].status, 3) << describe_runs(killed);
    EXPECT_THAT(killed[r].output, HasSubstr("DistBackendError"))
        << describe_runs(killed);
  }
  // Hung after its first piece: the others give up after the group's 3 s
  // (and gloo's own 3 s for the collective left behind). The harness's
  // bound leaves room for ranks that start slowly on a busy machine: what
  // is pinned is that they end by themselves, with the timeout's error.
  const auto hung = run_ranks(
      "mixed",
      checkpoint,
      3,
      [&](int r) {
        std::vector<std::string> args = {"--load", "--timeout-ms", "3000"};
        if (r == 2) {
          args.insert(args.end(), {"--hang-after", "1"});
        }
        return args;
      },
      std::chrono::seconds(30),
      {},
      {2});
  for (const int r : {0, 1}) {
    EXPECT_FALSE(hung[r].killed_by_harness) << describe_runs(hung);
    EXPECT_EQ(hung[r].status, 3) << describe_runs(hung);
    EXPECT_THAT(hung[r].output, HasSubstr("timeout of 3 s"))
        << describe_runs(hung);
  }
  EXPECT_TRUE(hung[2].killed_by_harness);
}

} // namespace
