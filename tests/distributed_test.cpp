// Distributed saving, tested as users run it: one process per rank on
// 127.0.0.1 (dist_worker, FileStore rendezvous), every run bounded in time,
// the result compared byte for byte with a single-process save of the full
// state dict.

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <torch/cuda.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <torchser/distributed.h>
#include <torchser/errors.h>
#include <torchser/process_group.h>
#include <torchser/save.h>

#include "dist_harness.h"
#include "dist_scenarios.h"
#include "test_utils.h"
#include "torchser/detail/shared_tensors.h"

namespace fs = std::filesystem;
using ::testing::HasSubstr;

namespace {

using torchser::testing::describe_runs;
using torchser::testing::RankRun;
using torchser::testing::read_all;
using torchser::testing::run_ranks;

// Every file of `a` and `b`, byte for byte.
void expect_same_directory(const fs::path& a, const fs::path& b) {
  std::vector<std::string> names_a;
  std::vector<std::string> names_b;
  for (const auto& e : fs::directory_iterator(a)) {
    names_a.push_back(e.path().filename().string());
  }
  for (const auto& e : fs::directory_iterator(b)) {
    names_b.push_back(e.path().filename().string());
  }
  std::sort(names_a.begin(), names_a.end());
  std::sort(names_b.begin(), names_b.end());
  ASSERT_EQ(names_a, names_b);
  for (const std::string& name : names_a) {
    EXPECT_TRUE(read_all(a / name) == read_all(b / name)) << name << " differs";
  }
}

std::vector<std::string> leftovers(const fs::path& dir) {
  std::vector<std::string> found;
  for (const fs::path& where : {dir, dir.parent_path()}) {
    for (const auto& e : fs::directory_iterator(where)) {
      if (e.path().filename().string().find(".torchser-") !=
          std::string::npos) {
        found.push_back(e.path().string());
      }
    }
  }
  return found;
}

std::uint64_t bytes_written(const std::vector<RankRun>& runs) {
  std::uint64_t total = 0;
  for (const RankRun& run : runs) {
    const auto at = run.output.find(" ok ");
    if (at != std::string::npos) {
      total += std::stoull(run.output.substr(at + 4));
    }
  }
  return total;
}

class DistributedSaveTest : public ::testing::Test {
 protected:
  fs::path dir(const std::string& name) {
    fs::create_directories(temp_ / name / "ckpt");
    return temp_.path() / name / "ckpt";
  }
  torchser::testing::TempDir temp_;
};

TEST_F(
    DistributedSaveTest,
    RankParallelSaveWritesTheSingleProcessFilesByteForByte) {
  for (const int world : {1, 2, 3, 4}) {
    for (const std::string shard_size : {"5GB", "600"}) {
      SCOPED_TRACE(
          "world " + std::to_string(world) + ", max_shard_size " + shard_size);
      const fs::path expected =
          dir("single-" + std::to_string(world) + shard_size);
      const auto s = torchser::testing::make_scenario("mixed", 0, 1);
      torchser::save_torch_state_dict(
          s.full,
          expected,
          torchser::SaveOptions().max_shard_size(
              torchser::testing::shard_size(shard_size)));
      const fs::path got = dir("dist-" + std::to_string(world) + shard_size);
      const auto runs = run_ranks("mixed", got, world, [&](int) {
        return std::vector<std::string>{"--max-shard-size", shard_size};
      });
      for (const RankRun& run : runs) {
        ASSERT_EQ(run.status, 0) << describe_runs(runs);
      }
      expect_same_directory(expected, got);
      if (shard_size == "600") {
        EXPECT_GT(
            std::distance(
                fs::directory_iterator(got), fs::directory_iterator()),
            3);
      }
      // Every byte written once: the ranks' bytes add up to the tensors'.
      std::uint64_t tensor_bytes = 0;
      for (const auto& item : torchser::detail::drop_aliases(s.full).kept) {
        tensor_bytes += item.value().numel() * item.value().element_size();
      }
      EXPECT_EQ(bytes_written(runs), tensor_bytes) << describe_runs(runs);
    }
  }
}

// Each stage holds other names: the full state dict is the stages in
// order, and views of one flat buffer are separate tensors, not ties.
TEST_F(
    DistributedSaveTest,
    PipelineStagesAndFlatBufferViewsSaveAsTheAssembledModel) {
  for (const int world : {2, 4}) {
    SCOPED_TRACE("world " + std::to_string(world));
    const auto s = torchser::testing::make_scenario("pipeline", 0, world);
    const fs::path expected = dir("single" + std::to_string(world));
    torchser::save_torch_state_dict(
        s.full, expected, torchser::SaveOptions().max_shard_size(150));
    const fs::path got = dir("dist" + std::to_string(world));
    const auto runs = run_ranks("pipeline", got, world, [](int) {
      return std::vector<std::string>{"--max-shard-size", "150"};
    });
    for (const RankRun& run : runs) {
      ASSERT_EQ(run.status, 0) << describe_runs(runs);
    }
    expect_same_directory(expected, got);
  }
}

TEST_F(DistributedSaveTest, KeyMappingAndDtypeApplyAsInASingleProcessSave) {
  const fs::path expected = dir("single");
  const auto s = torchser::testing::make_scenario("mixed", 0, 1);
  torchser::save_torch_state_dict(
      s.full,
      expected,
      torchser::SaveOptions()
          .max_shard_size(900)
          .key_mapping(torchser::KeyMapping().add_prefix("model."))
          .dtype(at::kBFloat16));
  const fs::path got = dir("dist");
  const auto runs = run_ranks("mixed", got, 3, [](int) {
    return std::vector<std::string>{
        "--max-shard-size", "900", "--key-mapping", "--dtype", "bf16"};
  });
  for (const RankRun& run : runs) {
    ASSERT_EQ(run.status, 0) << describe_runs(runs);
  }
  expect_same_directory(expected, got);
}

// torch.save archives: the pickle, the headers and the central directory
// come from the single-process writer's layout; each record's ZIP CRC-32 is
// folded from the runs the ranks wrote (column pieces interleave them).
TEST_F(DistributedSaveTest, PickleBinSavesMatchASingleProcessSaveByteForByte) {
  struct Case {
    std::string scenario;
    int world;
    std::vector<std::string> args;
    torchser::SaveOptions options;
  };
  const auto bin = [] {
    return torchser::SaveOptions().safe_serialization(false);
  };
  const std::vector<Case> cases = {
      {"mixed", 1, {"--max-shard-size", "5GB"}, bin()},
      {"mixed", 2, {"--max-shard-size", "5GB"}, bin()},
      {"mixed", 3, {"--max-shard-size", "600"}, bin().max_shard_size(600)},
      {"mixed", 4, {"--max-shard-size", "600"}, bin().max_shard_size(600)},
      {"mixed",
       3,
       {"--max-shard-size", "900", "--key-mapping", "--dtype", "bf16"},
       bin()
           .max_shard_size(900)
           .key_mapping(torchser::KeyMapping().add_prefix("model."))
           .dtype(at::kBFloat16)},
      {"pipeline", 4, {"--max-shard-size", "150"}, bin().max_shard_size(150)},
  };
  int n = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.scenario + ", world " + std::to_string(c.world));
    const auto s = torchser::testing::make_scenario(c.scenario, 0, c.world);
    const fs::path expected = dir("single" + std::to_string(n));
    torchser::save_torch_state_dict(s.full, expected, c.options);
    const fs::path got = dir("dist" + std::to_string(n++));
    std::vector<std::string> args = c.args;
    args.push_back("--bin");
    const auto runs =
        run_ranks(c.scenario, got, c.world, [&](int) { return args; });
    for (const RankRun& run : runs) {
      ASSERT_EQ(run.status, 0) << describe_runs(runs);
    }
    expect_same_directory(expected, got);
    EXPECT_TRUE(
        fs::exists(got / "pytorch_model.bin") ||
        fs::exists(got / "pytorch_model.bin.index.json"));
  }
}

// Column pieces interleave the ranks' runs: each tensor's CRC-32C is folded
// from runs that three ranks wrote.
TEST_F(
    DistributedSaveTest,
    ChecksumsCombinedFromEveryRanksRunsMatchASingleProcessSave) {
  const fs::path expected = dir("single");
  const auto s = torchser::testing::make_scenario("mixed", 0, 1);
  torchser::save_torch_state_dict(
      s.full,
      expected,
      torchser::SaveOptions().max_shard_size(600).checksums(true));
  const fs::path got = dir("dist");
  const auto runs = run_ranks("mixed", got, 3, [](int) {
    return std::vector<std::string>{"--max-shard-size", "600", "--checksums"};
  });
  for (const RankRun& run : runs) {
    ASSERT_EQ(run.status, 0) << describe_runs(runs);
  }
  expect_same_directory(expected, got);
  const auto verify = torchser::testing::run_command(
      std::string(TORCHSER_CLI) + " verify '" + got.string() + "'");
  EXPECT_EQ(verify.status, 0) << verify.output;
}

TEST_F(
    DistributedSaveTest,
    BadPlacementsFailOnEveryRankNamingTheTensorAndTheRanks) {
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"bad-overlap",
       {"'layers.0.up.weight'",
        "rank 1 (offsets [8, 0], shape [8, 16]) and rank 2 (offsets [15, 0], "
        "shape [7, 16]) overlap",
        "overlap"}},
      {"bad-hole",
       {"'layers.0.up.weight'",
        "ranks 0, 1 and 2",
        "hold 352 of its 368 elements, leaving 16 held by no piece"}},
      {"bad-dtype",
       {"'layers.0.norm.weight'",
        "dtype BFloat16 on rank 0 but Float on rank 2"}},
      {"bad-shape",
       {"'layers.0.up.weight'",
        "full shape [23, 16] on rank 0 but [24, 16] on rank 2"}},
      {"bad-tie", {"'embed.weight' and 'lm_head.weight'", "not on rank 2"}},
  };
  for (const auto& [scenario, wanted] : cases) {
    SCOPED_TRACE(scenario);
    const fs::path got = dir(scenario);
    const auto runs = run_ranks(
        scenario, got, 3, [](int) { return std::vector<std::string>{}; });
    for (const RankRun& run : runs) {
      EXPECT_EQ(run.status, 3) << describe_runs(runs);
      EXPECT_THAT(run.output, HasSubstr("ValueError")) << describe_runs(runs);
      for (const std::string& text : wanted) {
        EXPECT_THAT(run.output, HasSubstr(text)) << describe_runs(runs);
      }
    }
    EXPECT_TRUE(fs::is_empty(got));
    EXPECT_THAT(leftovers(got), ::testing::IsEmpty());
  }
}

TEST_F(
    DistributedSaveTest, RanksWithDifferentOptionsFailTogetherBeforeAnyFile) {
  const fs::path got = dir("options");
  const auto runs = run_ranks("mixed", got, 2, [](int r) {
    return std::vector<std::string>{"--max-shard-size", r == 0 ? "600" : "900"};
  });
  for (const RankRun& run : runs) {
    EXPECT_EQ(run.status, 3) << describe_runs(runs);
    EXPECT_THAT(
        run.output,
        HasSubstr(
            "ValueError: Rank 1's SaveOptions give other files than rank 0's"));
  }
  EXPECT_TRUE(fs::is_empty(got));
  EXPECT_THAT(leftovers(got), ::testing::IsEmpty());
}

// The checkpoint a failed save must leave whole.
struct OldCheckpoint {
  explicit OldCheckpoint(const fs::path& dir) : dir(dir) {
    torchser::StateDict old;
    old.insert("old.weight", at::arange(300, at::kFloat));
    old.insert("old.bias", at::arange(7, at::kFloat));
    torchser::save_torch_state_dict(
        old, dir, torchser::SaveOptions().max_shard_size("1KB"));
    for (const auto& e : fs::directory_iterator(dir)) {
      files[e.path().filename().string()] = read_all(e.path());
    }
  }
  void expect_whole() const {
    std::map<std::string, std::string> now;
    for (const auto& e : fs::directory_iterator(dir)) {
      now[e.path().filename().string()] = read_all(e.path());
    }
    EXPECT_TRUE(now == files) << "the old checkpoint changed";
  }
  fs::path dir;
  std::map<std::string, std::string> files;
};

TEST_F(
    DistributedSaveTest,
    ARankKilledWhileWritingFailsTheOthersAndLeavesTheOldCheckpointWhole) {
  // (rank, after how many pieces it dies): early, late, rank 0 included.
  for (const auto& kill : std::vector<std::pair<int, int>>{
           {1, 2}, {0, 2}, {2, 9}, {1, 11}, {0, 7}}) {
    const int victim = kill.first;
    const int point = kill.second;
    SCOPED_TRACE(
        "rank " + std::to_string(victim) + " killed after " +
        std::to_string(point) + " pieces");
    const fs::path got =
        dir("killed" + std::to_string(victim) + "-" + std::to_string(point));
    const OldCheckpoint old(got);
    const auto runs = run_ranks("mixed", got, 3, [&](int r) {
      std::vector<std::string> args = {
          "--max-shard-size", "600", "--timeout-ms", "60000"};
      if (r == victim) {
        args.insert(args.end(), {"--kill-after", std::to_string(point)});
      }
      return args;
    });
    for (int r = 0; r < 3; ++r) {
      if (r == victim) {
        EXPECT_EQ(runs[r].status, -SIGKILL) << describe_runs(runs);
        continue;
      }
      // The others notice the dead peer by themselves, long before the
      // group's timeout.
      EXPECT_FALSE(runs[r].killed_by_harness) << describe_runs(runs);
      EXPECT_EQ(runs[r].status, 3) << describe_runs(runs);
      EXPECT_THAT(runs[r].output, HasSubstr("DistBackendError"))
          << describe_runs(runs);
    }
    old.expect_whole();
    if (victim != 0) {
      // Rank 0 removed what it had created.
      EXPECT_THAT(leftovers(got), ::testing::IsEmpty());
    } else {
      // A dead rank 0 cannot; the next save or load of the folder does.
      torchser::recover_interrupted_save(got);
      EXPECT_THAT(leftovers(got), ::testing::IsEmpty());
      old.expect_whole();
    }
  }
}

TEST_F(
    DistributedSaveTest,
    ARankThatHangsMakesTheOthersFailWithinTheGroupTimeout) {
  const fs::path got = dir("hung");
  const OldCheckpoint old(got);
  const auto runs = run_ranks(
      "mixed",
      got,
      3,
      [](int r) {
        std::vector<std::string> args = {
            "--max-shard-size", "600", "--timeout-ms", "3000"};
        if (r == 2) {
          args.insert(args.end(), {"--hang-after", "1"});
        }
        return args;
      },
      std::chrono::seconds(30),
      {},
      {2});
  for (int r = 0; r < 2; ++r) {
    EXPECT_FALSE(runs[r].killed_by_harness) << describe_runs(runs);
    EXPECT_EQ(runs[r].status, 3) << describe_runs(runs);
    EXPECT_THAT(runs[r].output, HasSubstr("DistBackendError"))
        << describe_runs(runs);
    EXPECT_THAT(runs[r].output, HasSubstr("timeout of 3 s"))
        << describe_runs(runs);
  }
  EXPECT_TRUE(runs[2].killed_by_harness);
  old.expect_whole();
  EXPECT_THAT(leftovers(got), ::testing::IsEmpty());
}

TEST_F(DistributedSaveTest, ARankThatLeavesBeforeTheSaveFailsTheOthers) {
  const fs::path got = dir("left");
  const OldCheckpoint old(got);
  const auto runs =
      run_ranks("mixed", got, 2, [](int r) {
        return r == 1 ? std::vector<std::string>{"--exit-before-save", "--timeout-ms", "60000"}
                  : std::vector<std::string>{"--timeout-ms", "60000"};
      });
  EXPECT_EQ(runs[1].status, 0);
  EXPECT_FALSE(runs[0].killed_by_harness) << describe_runs(runs);
  EXPECT_EQ(runs[0].status, 3) << describe_runs(runs);
  EXPECT_THAT(runs[0].output, HasSubstr("DistBackendError"))
      << describe_runs(runs);
  EXPECT_THAT(runs[0].output, HasSubstr("rank 0 of 2")) << describe_runs(runs);
  old.expect_whole();
}

// Rank 1 runs in its own mount namespace with a fresh tmpfs over the
// checkpoint's parent: the directory exists for it, but not rank 0's files.
TEST_F(DistributedSaveTest, RanksThatDoNotShareTheFilesystemAreToldSo) {
  const fs::path got = dir("unshared");
  if (torchser::testing::run_command(
          "unshare -m --propagation private sh -c 'mount -t tmpfs tmpfs " +
          got.parent_path().string() + "'")
          .status != 0) {
    GTEST_SKIP() << "this machine lets no process mount a tmpfs in its own "
                    "mount namespace (unshare -m)";
  }
  const OldCheckpoint old(got);
  const auto runs = run_ranks(
      "mixed",
      got,
      2,
      [](int) {
        return std::vector<std::string>{"--timeout-ms", "60000"};
      },
      std::chrono::seconds(120),
      [&](int r) {
        if (r != 1) {
          return std::vector<std::string>{};
        }
        return std::vector<std::string>{
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs \"$0\" && mkdir \"$0/ckpt\" && exec \"$@\"",
            got.parent_path().string()};
      });
  EXPECT_EQ(runs[1].status, 3) << describe_runs(runs);
  EXPECT_THAT(runs[1].output, HasSubstr("OSError: rank 1 (host "));
  EXPECT_THAT(runs[1].output, HasSubstr("which rank 0 (host "));
  EXPECT_THAT(runs[1].output, HasSubstr("on a filesystem all ranks share"));
  EXPECT_EQ(runs[0].status, 3) << describe_runs(runs);
  EXPECT_THAT(
      runs[0].output,
      HasSubstr("DistError: writing the tensors failed on 1 of 2 ranks"));
  EXPECT_THAT(runs[0].output, HasSubstr("rank 1 failed: rank 1 (host"));
  old.expect_whole();
  EXPECT_THAT(leftovers(got), ::testing::IsEmpty());
}

// ---------------------------------------------------------------------------
// In one process: the vocabulary and the group's options.

using Range = std::pair<std::int64_t, std::int64_t>;

TEST(PlacementTest, ChunkRangeSplitsAsTorchChunk) {
  // torch.arange(10).chunk(4): sizes 3, 3, 3, 1; chunk(3) of 2: 1, 1, empty.
  EXPECT_EQ(torchser::chunk_range(10, 0, 4), Range(0, 3));
  EXPECT_EQ(torchser::chunk_range(10, 3, 4), Range(9, 1));
  EXPECT_EQ(torchser::chunk_range(2, 2, 3), Range(2, 0));
  EXPECT_THROW(torchser::chunk_range(10, 4, 4), torchser::ValueError);
}

TEST(PlacementTest, APieceThatDoesNotFitItsPlacementNamesTheTensor) {
  std::vector<std::int64_t> full;
  std::vector<std::int64_t> offsets;
  const at::Tensor local = at::zeros({4, 3});
  try {
    torchser::Placement::shard(0, 10, 7).locate(local, "w", full, offsets);
    FAIL();
  } catch (const torchser::ValueError& e) {
    EXPECT_THAT(e.what(), HasSubstr("Tensor 'w'"));
    EXPECT_THAT(
        e.what(), HasSubstr("offset 7 plus size 4 leaves the full size 10"));
  }
  EXPECT_THROW(
      torchser::Placement::shard(2, 10, 0).locate(local, "w", full, offsets),
      torchser::ValueError);
  EXPECT_THROW(
      torchser::Placement::block({4}, {0}).locate(local, "w", full, offsets),
      torchser::ValueError);
  torchser::Placement::block({8, 6}, {4, 3}).locate(local, "w", full, offsets);
  EXPECT_EQ(full, (std::vector<std::int64_t>{8, 6}));
  EXPECT_EQ(offsets, (std::vector<std::int64_t>{4, 3}));
  EXPECT_THROW(
      torchser::distribute(
          torchser::StateDict(),
          {{"missing", torchser::Placement::replicate()}}),
      torchser::ValueError);
}

TEST(PlacementTest, DistributeGivesATiedNameItsTiesPlacement) {
  torchser::StateDict local;
  const at::Tensor w = at::zeros({2, 3});
  local.insert("embed.weight", w);
  local.insert("lm_head.weight", w);
  local.insert("norm", at::ones({3}));
  const auto placed = torchser::distribute(
      local, {{"embed.weight", torchser::Placement::shard(0, 4, 2)}});
  EXPECT_TRUE(
      placed["lm_head.weight"].placement ==
      torchser::Placement::shard(0, 4, 2));
  EXPECT_TRUE(placed["norm"].placement.is_replicate());
}

TEST(ProcessGroupTest, MissingOrBadSettingsAreValueErrorsNamingThem) {
  ::unsetenv("RANK");
  ::unsetenv("WORLD_SIZE");
  ::unsetenv("MASTER_ADDR");
  ::unsetenv("MASTER_PORT");
  const auto message = [](const torchser::ProcessGroupOptions& options) {
    try {
      torchser::init_process_group(options);
    } catch (const torchser::ValueError& e) {
      return std::string(e.what());
    }
    return std::string("no ValueError");
  };
  EXPECT_THAT(message({}), HasSubstr("WORLD_SIZE is not set"));
  EXPECT_THAT(
      message(torchser::ProcessGroupOptions().rank(0).world_size(1)),
      HasSubstr("MASTER_ADDR and MASTER_PORT"));
  EXPECT_THAT(
      message(torchser::ProcessGroupOptions().rank(2).world_size(2)),
      HasSubstr("rank 2 is not below the world size 2"));
  EXPECT_THAT(
      message(torchser::ProcessGroupOptions().rank(0).world_size(1).init_method(
          "udp://x")),
      HasSubstr("is not env://, tcp://HOST:PORT or file:///PATH"));
  EXPECT_THAT(
      message(torchser::ProcessGroupOptions().rank(0).world_size(1).init_method(
          "tcp://h:99999")),
      HasSubstr("above 65535"));
  EXPECT_THAT(
      message(
          torchser::ProcessGroupOptions().backend("mpi").rank(0).world_size(1)),
      HasSubstr("'mpi' is not one torchser offers"));
  if (!torchser::is_nccl_available()) {
    EXPECT_THAT(
        message(
            torchser::ProcessGroupOptions().backend("nccl").rank(0).world_size(
                1)),
        HasSubstr("needs a LibTorch built with CUDA and NCCL"));
  }
  ::setenv("WORLD_SIZE", "two", 1);
  EXPECT_THAT(
      message(torchser::ProcessGroupOptions().rank(0)),
      HasSubstr("the environment variable WORLD_SIZE is 'two'"));
  ::unsetenv("WORLD_SIZE");
}

// A peer that dies mid-collective must be a DistBackendError on the ranks
// left, never SIGPIPE's silent death in a socket write (seen: a rank killed
// while its peer wrote to it). Forming a group ignores SIGPIPE when its
// action is the default; a handler of the program's stays.
void count_sigpipe(int) {}

TEST(ProcessGroupTest, FormingAGroupIgnoresSigpipeUnlessTheProgramHandlesIt) {
  const torchser::testing::TempDir temp;
  struct sigaction saved {};
  ASSERT_EQ(::sigaction(SIGPIPE, nullptr, &saved), 0);
  const auto form = [&](const std::string& name) {
    return torchser::init_process_group(
        torchser::ProcessGroupOptions()
            .init_method("file://" + (temp.path() / name).string())
            .rank(0)
            .world_size(1)
            .hostname("127.0.0.1")
            .timeout(std::chrono::seconds(20)));
  };
  struct sigaction action {};
  action.sa_handler = SIG_DFL;
  ::sigemptyset(&action.sa_mask);
  ASSERT_EQ(::sigaction(SIGPIPE, &action, nullptr), 0);
  form("default");
  struct sigaction now {};
  ::sigaction(SIGPIPE, nullptr, &now);
  EXPECT_EQ(now.sa_handler, SIG_IGN);
  action.sa_handler = count_sigpipe;
  ASSERT_EQ(::sigaction(SIGPIPE, &action, nullptr), 0);
  form("handled");
  ::sigaction(SIGPIPE, nullptr, &now);
  EXPECT_EQ(now.sa_handler, count_sigpipe);
  ::sigaction(SIGPIPE, &saved, nullptr);
}

TEST(ProcessGroupTest, AOneRankGroupSavesInProcess) {
  const torchser::testing::TempDir temp;
  const fs::path root = temp.path();
  const torchser::ProcessGroup group = torchser::init_process_group(
      torchser::ProcessGroupOptions()
          .init_method("file://" + (root / "store").string())
          .rank(0)
          .world_size(1)
          .hostname("127.0.0.1")
          .timeout(std::chrono::seconds(20)));
  EXPECT_EQ(group.rank(), 0);
  EXPECT_EQ(group.size(), 1);
  EXPECT_EQ(group.backend(), "gloo");
  group.barrier();
  const auto s = torchser::testing::make_scenario("mixed", 0, 1);
  fs::create_directories(root / "single");
  fs::create_directories(root / "dist");
  torchser::save_torch_state_dict(
      s.full, root / "single", torchser::SaveOptions().max_shard_size(700));
  const auto result = torchser::save_torch_state_dict(
      s.local,
      root / "dist",
      group,
      torchser::SaveOptions().max_shard_size(700));
  expect_same_directory(root / "single", root / "dist");
  EXPECT_EQ(result.bytes_written, result.total_bytes);
  EXPECT_EQ(result.files.back(), "model.safetensors.index.json");
  // A bad placement fails alone, as a ValueError.
  const auto bad = torchser::testing::make_scenario("bad-hole", 0, 1);
  EXPECT_THROW(
      torchser::save_torch_state_dict(bad.local, root / "dist", group),
      torchser::ValueError);
  expect_same_directory(root / "single", root / "dist");
}

// Runs where the build has NCCL and the host a GPU (tests/device/check.sh):
// the group's collectives move bytes through CUDA, the pieces are copied to
// the file through the chunk.
TEST(ProcessGroupTest, AnNcclGroupSavesCudaPiecesAsASingleProcessSave) {
  if (!torchser::is_nccl_available() || !torch::cuda::is_available()) {
    GTEST_SKIP() << "needs a build with NCCL and a CUDA device";
  }
  const torchser::testing::TempDir temp;
  const fs::path root = temp.path();
  const torchser::ProcessGroup group = torchser::init_process_group(
      torchser::ProcessGroupOptions()
          .backend("nccl")
          .device_id(0)
          .init_method("file://" + (root / "store").string())
          .rank(0)
          .world_size(1)
          .timeout(std::chrono::seconds(60)));
  EXPECT_EQ(group.backend(), "nccl");
  const auto s = torchser::testing::make_scenario("mixed", 0, 1);
  torchser::DistributedStateDict on_gpu;
  std::vector<std::pair<at::Tensor, at::Tensor>> moved; // ties stay ties
  for (const auto& item : s.local) {
    torchser::DistributedTensor t = item.value();
    const auto same =
        std::find_if(moved.begin(), moved.end(), [&](const auto& m) {
          return m.first.is_same(t.local);
        });
    const at::Tensor cuda =
        same != moved.end() ? same->second : t.local.to(at::kCUDA);
    moved.emplace_back(t.local, cuda);
    t.local = cuda;
    on_gpu.insert(item.key(), t);
  }
  for (const bool safe : {true, false}) {
    const auto options =
        torchser::SaveOptions().max_shard_size(700).safe_serialization(safe);
    const fs::path single = root / ("single" + std::to_string(safe));
    const fs::path dist = root / ("dist" + std::to_string(safe));
    fs::create_directories(single);
    fs::create_directories(dist);
    torchser::save_torch_state_dict(s.full, single, options);
    torchser::save_torch_state_dict(on_gpu, dist, group, options);
    expect_same_directory(single, dist);
  }
}

} // namespace
