// The checkpoint layer (torchser/detail/checkpoint_dir.h, tensor_file.h):
// how a save replaces a checkpoint, the lock across a swap, what an
// interrupted save leaves and how it is reported, and the format chosen by
// content.

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <torch/nn/modules/linear.h>

#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"
#include "torchser/detail/checkpoint_dir.h"
#include "torchser/detail/tensor_file.h"

namespace torchser {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using torchser::testing::TempDir;
using torchser::testing::write_file;

StateDict generation(int g, int n = 6) {
  StateDict sd;
  for (int i = 0; i < n; ++i) {
    sd.insert(
        "w" + std::to_string(i), at::full({1024}, static_cast<float>(g + i)));
  }
  return sd;
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

ino_t inode_of(const fs::path& path) {
  struct stat st {};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0) << path;
  return st.st_ino;
}

TEST(
    CheckpointCommitTest,
    ASaveOfSeveralFilesSwapsInADirectoryThatKeepsTheFilesItDoesNotOwn) {
  TempDir parent;
  const fs::path dir = parent / "ckpt";
  fs::create_directories(dir);
  save_torch_state_dict(
      generation(0), dir, SaveOptions().max_shard_size(8000)); // 6 shards
  write_file(dir / "config.json", "{}");
  write_file(dir / "model.safetensors.bak", "mine");
  ::chmod(dir.c_str(), 0750);
  const ino_t config = inode_of(dir / "config.json");
  const ino_t before = inode_of(dir);
  {
    detail::CheckpointCommit commit(dir, 2, /*durable=*/false);
    EXPECT_EQ(commit.mode(), detail::CheckpointCommit::Mode::kSwap);
  }
  save_torch_state_dict(
      generation(100), dir, SaveOptions().max_shard_size(16000)); // 2 shards
  EXPECT_NE(inode_of(dir), before);                 // a new directory
  EXPECT_EQ(inode_of(dir / "config.json"), config); // the same file, linked
  EXPECT_EQ(
      torchser::testing::read_file(dir / "model.safetensors.bak"), "mine");
  EXPECT_EQ(
      names_in(dir),
      (std::vector<std::string>{
          "config.json",
          "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors",
          "model.safetensors.bak",
          "model.safetensors.index.json"}));
  EXPECT_EQ(
      names_in(parent.path()),
      std::vector<std::string>{"ckpt"}); // no staging directory left
  struct stat st {};
  ASSERT_EQ(::stat(dir.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0750U);
  EXPECT_EQ(
      load_file(dir / "model-00002-of-00002.safetensors")["w5"][0]
          .item<float>(),
      105.0F);
}

TEST(
    CheckpointCommitTest,
    OneFileReplacingItselfIsRenamedAndOneReplacingShardsIsSwapped) {
  TempDir dir;
  save_torch_state_dict(generation(0), dir.path());
  const ino_t before = inode_of(dir.path());
  {
    detail::CheckpointCommit commit(dir.path(), 1, /*durable=*/false);
    EXPECT_EQ(commit.mode(), detail::CheckpointCommit::Mode::kSingleFile);
  }
  save_torch_state_dict(generation(7), dir.path()); // over itself: one rename
  EXPECT_EQ(inode_of(dir.path()), before);
  EXPECT_EQ(load_file(dir / "model.safetensors")["w0"][0].item<float>(), 7.0F);
  // Over a sharded checkpoint, one file replaces several: swapped in whole,
  // so no reader ever sees the new file beside stale shards.
  save_torch_state_dict(
      generation(0), dir.path(), SaveOptions().max_shard_size(8000));
  const ino_t sharded = inode_of(dir.path());
  save_torch_state_dict(generation(9), dir.path());
  EXPECT_NE(inode_of(dir.path()), sharded);
  EXPECT_EQ(
      names_in(dir.path()), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(load_file(dir / "model.safetensors")["w0"][0].item<float>(), 9.0F);
}

TEST(CheckpointCommitTest, WhereASwapCannotWorkTheJournalCommits) {
  TempDir parent;
  const fs::path dir = parent / "pipeline";
  fs::create_directories(
      dir /
      "text_encoder"); // a subdirectory cannot be linked into a new directory
  write_file(dir / "text_encoder" / "config.json", "{}");
  save_torch_state_dict(generation(0), dir, SaveOptions().max_shard_size(8000));
  {
    detail::CheckpointCommit commit(dir, 2, /*durable=*/false);
    EXPECT_EQ(commit.mode(), detail::CheckpointCommit::Mode::kJournal);
  }
  const ino_t before = inode_of(dir);
  save_torch_state_dict(
      generation(100), dir, SaveOptions().max_shard_size(8000));
  EXPECT_EQ(inode_of(dir), before);
  EXPECT_TRUE(fs::exists(dir / "text_encoder" / "config.json"));
  EXPECT_EQ(names_in(parent.path()), std::vector<std::string>{"pipeline"});
  // The process's own working directory is never swapped away under it.
  TempDir other;
  save_torch_state_dict(
      generation(0), other.path(), SaveOptions().max_shard_size(8000));
  const fs::path cwd = fs::current_path();
  fs::current_path(other.path());
  {
    detail::CheckpointCommit commit(".", 2, /*durable=*/false);
    EXPECT_EQ(commit.mode(), detail::CheckpointCommit::Mode::kJournal);
  }
  save_torch_state_dict(generation(5), ".", SaveOptions().max_shard_size(8000));
  fs::current_path(cwd);
  EXPECT_EQ(
      load_file(other / "model-00001-of-00006.safetensors")["w0"][0]
          .item<float>(),
      5.0F);
}

// A filesystem without RENAME_EXCHANGE (the exchange fails with EINVAL):
// the staged files move beside the old ones and the journal commits them.
TEST(CheckpointCommitTest, AFilesystemWithoutTheExchangeFallsBackToTheJournal) {
  TempDir parent;
  const fs::path dir = parent / "ckpt";
  fs::create_directories(dir);
  save_torch_state_dict(generation(0), dir, SaveOptions().max_shard_size(8000));
  write_file(dir / "config.json", "{}");
  const ino_t before = inode_of(dir);
  static int calls = 0;
  calls = 0;
  const auto previous =
      detail::replace_exchange_for_testing([](const char*, const char*) {
        ++calls;
        errno = EINVAL;
        return -1;
      });
  save_torch_state_dict(
      generation(100), dir, SaveOptions().max_shard_size(16000));
  detail::replace_exchange_for_testing(previous);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(inode_of(dir), before); // committed in place
  EXPECT_EQ(
      names_in(dir),
      (std::vector<std::string>{
          "config.json",
          "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors",
          "model.safetensors.index.json"}));
  EXPECT_EQ(names_in(parent.path()), std::vector<std::string>{"ckpt"});
  EXPECT_EQ(
      load_file(dir / "model-00002-of-00002.safetensors")["w5"][0]
          .item<float>(),
      105.0F);
  // Any other failure of the exchange is an error naming the directory, and
  // the old checkpoint stays.
  const auto kept = names_in(dir);
  const auto previous2 =
      detail::replace_exchange_for_testing([](const char*, const char*) {
        errno = EIO;
        return -1;
      });
  EXPECT_THAT(
      [&] {
        save_torch_state_dict(
            generation(7), dir, SaveOptions().max_shard_size(8000));
      },
      ::testing::ThrowsMessage<OSError>(HasSubstr(dir.string())));
  detail::replace_exchange_for_testing(previous2);
  EXPECT_EQ(names_in(dir), kept);
  EXPECT_EQ(names_in(parent.path()), std::vector<std::string>{"ckpt"});
}

TEST(CheckpointCommitTest, ASymlinkToTheCheckpointStaysALink) {
  TempDir parent;
  fs::create_directories(parent / "real");
  fs::create_directory_symlink("real", parent / "latest");
  save_torch_state_dict(
      generation(0), parent / "latest", SaveOptions().max_shard_size(8000));
  save_torch_state_dict(
      generation(9), parent / "latest", SaveOptions().max_shard_size(8000));
  EXPECT_TRUE(fs::is_symlink(parent / "latest"));
  EXPECT_EQ(
      load_file(parent / "real" / "model-00001-of-00006.safetensors")["w0"][0]
          .item<float>(),
      9.0F);
  EXPECT_EQ(
      names_in(parent.path()), (std::vector<std::string>{"latest", "real"}));
}

TEST(CheckpointCommitTest, AFailedSaveLeavesTheOldCheckpointAndNothingElse) {
  TempDir parent;
  const fs::path dir = parent / "ckpt";
  fs::create_directories(dir);
  save_torch_state_dict(generation(0), dir, SaveOptions().max_shard_size(8000));
  const auto before = names_in(dir);
  int calls = 0;
  EXPECT_THROW(
      save_torch_state_dict(
          generation(1),
          dir,
          SaveOptions().max_shard_size(8000).progress([&](const Progress&) {
            if (++calls == 3) {
              throw ValueError("stop");
            }
          })),
      ValueError);
  EXPECT_EQ(names_in(dir), before);
  EXPECT_EQ(names_in(parent.path()), std::vector<std::string>{"ckpt"});
  EXPECT_EQ(
      load_file(dir / "model-00001-of-00006.safetensors")["w0"][0]
          .item<float>(),
      0.0F);
}

TEST(CheckpointCommitTest, ProgressIsReportedPerTensorUpToTheTotal) {
  for (const bool safe : {true, false}) {
    TempDir dir;
    std::vector<Progress> seen;
    StateDict sd = generation(0);
    sd.insert(
        "tied", sd["w0"]); // a second name on a storage counts no bytes again
    save_torch_state_dict(
        sd,
        dir.path(),
        SaveOptions().safe_serialization(safe).max_shard_size(8000).progress(
            [&](const Progress& p) { seen.push_back(p); }));
    ASSERT_EQ(seen.size(), safe ? 6U : 7U);
    for (std::size_t i = 1; i < seen.size(); ++i) {
      EXPECT_GE(seen[i].bytes_done, seen[i - 1].bytes_done);
    }
    EXPECT_EQ(seen.back().bytes_done, 6U * 4096U);
    EXPECT_EQ(seen.back().bytes_total, 6U * 4096U);
    EXPECT_THAT(seen.front().file, HasSubstr(safe ? ".safetensors" : ".bin"));
  }
}

// A waiter woken holding the lock of a directory that a swap replaced tries
// again on the directory the path names now.
TEST(DirectoryLockTest, ALockFollowsThePathAcrossAnInodeChange) {
  TempDir parent;
  const fs::path dir = parent / "ckpt";
  fs::create_directories(dir);
  auto first = std::make_unique<detail::DirectoryLock>(
      dir, detail::DirectoryLock::Mode::kExclusive, true);
  ASSERT_TRUE(first->held());
  std::atomic<bool> granted{false};
  std::thread waiter([&] {
    const detail::DirectoryLock second(
        dir, detail::DirectoryLock::Mode::kExclusive, true);
    granted = second.held();
    while (granted) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(granted);
  fs::rename(dir, parent / "old");
  fs::create_directories(dir);
  first.reset(); // wakes the waiter on the old directory
  while (!granted) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  // It holds the new directory's lock, not the old one's.
  EXPECT_FALSE(
      detail::DirectoryLock(dir, detail::DirectoryLock::Mode::kExclusive, false)
          .held());
  EXPECT_TRUE(
      detail::DirectoryLock(
          parent / "old", detail::DirectoryLock::Mode::kExclusive, false)
          .held());
  granted = false;
  waiter.join();
}

TEST(InterruptedSaveTest, LeftoversAreReportedUntilRecoveryRemovesThem) {
  TempDir parent;
  const fs::path dir = parent / "ckpt";
  fs::create_directories(dir);
  save_torch_state_dict(generation(0), dir, SaveOptions().max_shard_size(8000));
  EXPECT_EQ(detail::interrupted_save(dir), std::nullopt);
  // A swap killed before its commit point: a staging directory beside it.
  fs::create_directories(parent / ".ckpt.torchser-save.AbC123");
  auto said = detail::interrupted_save(dir);
  ASSERT_TRUE(said.has_value());
  EXPECT_THAT(*said, HasSubstr(".ckpt.torchser-save.AbC123"));
  EXPECT_THAT(*said, HasSubstr("previous checkpoint, whole"));
  // A journal save killed after its commit point.
  write_file(
      dir / ".torchser-commit.json",
      R"({"version":1,"renames":[],"remove":[]})");
  said = detail::interrupted_save(dir);
  ASSERT_TRUE(said.has_value());
  EXPECT_THAT(*said, HasSubstr("after its commit point"));
  // A save in progress holds the lock: said as such.
  {
    const detail::DirectoryLock saving(
        dir, detail::DirectoryLock::Mode::kExclusive, true);
    EXPECT_THAT(
        detail::interrupted_save(dir).value_or(""), HasSubstr("in progress"));
  }
  EXPECT_TRUE(recover_interrupted_save(dir));
  EXPECT_EQ(detail::interrupted_save(dir), std::nullopt);
  EXPECT_EQ(names_in(parent.path()), std::vector<std::string>{"ckpt"});
}

TEST(InterruptedSaveTest, AJournalNamingAFileOutsideTheDirectoryIsRefused) {
  TempDir dir;
  write_file(
      dir / ".torchser-commit.json",
      R"({"version":1,"renames":[],"remove":[".."]})");
  EXPECT_THROW(recover_interrupted_save(dir.path()), OSError);
  write_file(
      dir / ".torchser-commit.json",
      R"({"version":1,"renames":[["a","../b"]],"remove":[]})");
  EXPECT_THROW(recover_interrupted_save(dir.path()), OSError);
}

TEST(TensorFileTest, TheFormatIsChosenByContentWhereTheExtensionLies) {
  TempDir dir;
  const StateDict sd = generation(3, 2);
  torch_save(
      sd, dir / "weights.safetensors"); // a torch.save file with the wrong name
  save_file(
      sd,
      dir / "weights.bin",
      SafetensorsMetadata{{"format", "pt"}}); // and the reverse
  for (const char* name : {"weights.safetensors", "weights.bin"}) {
    std::string note;
    const auto format = detail::sniff_format(dir / name, &note);
    EXPECT_EQ(
        format,
        std::string(name) == "weights.bin" ? detail::TensorFormat::kSafetensors
                                           : detail::TensorFormat::kPickle);
    EXPECT_THAT(note, HasSubstr("despite its name")) << name;
    const StateDict loaded = load_state_dict_from_file(dir / name);
    EXPECT_TRUE(loaded["w1"].equal(sd["w1"])) << name;
  }
  std::string note;
  save_file(sd, dir / "right.safetensors");
  EXPECT_EQ(
      detail::sniff_format(dir / "right.safetensors", &note),
      detail::TensorFormat::kSafetensors);
  EXPECT_EQ(note, "");
}

TEST(ResolveTest, OneSetOfRulesForEveryLayout) {
  TempDir dir;
  detail::ResolveOptions cli;
  cli.allow_pickle = true;
  cli.allow_dduf = true;
  // Both formats: safetensors first, and said.
  save_file(
      generation(0, 1),
      dir / "model.safetensors",
      SafetensorsMetadata{{"format", "pt"}});
  torch_save(generation(0, 1), dir / "pytorch_model.bin");
  auto found = detail::resolve_checkpoint(dir.path(), cli);
  EXPECT_EQ(found.files, std::vector<fs::path>{dir / "model.safetensors"});
  EXPECT_THAT(found.note, HasSubstr("also holds pytorch_model.bin"));
  // An index path stands for its folder's sharded checkpoint.
  TempDir sharded;
  save_torch_state_dict(
      generation(0), sharded.path(), SaveOptions().max_shard_size(8000));
  found =
      detail::resolve_checkpoint(sharded / "model.safetensors.index.json", cli);
  EXPECT_EQ(found.kind, detail::Checkpoint::Kind::kSharded);
  EXPECT_EQ(found.files.size(), 6U);
  // Another pattern's only index (diffusers' names) is a sharded checkpoint.
  TempDir diffusers;
  save_torch_state_dict(
      generation(0),
      diffusers.path(),
      SaveOptions().max_shard_size(8000).filename_pattern(
          "diffusion_pytorch_model{suffix}.safetensors"));
  found =
      detail::resolve_checkpoint(diffusers.path(), detail::ResolveOptions{});
  EXPECT_EQ(found.kind, detail::Checkpoint::Kind::kSharded);
  // A DDUF archive is the CLI's, not a module load's.
  write_file(dir / "p.dduf", "");
  EXPECT_THAT(
      [&] {
        detail::resolve_checkpoint(dir / "p.dduf", detail::ResolveOptions{});
      },
      ::testing::ThrowsMessage<ValueError>(
          HasSubstr("load_torch_model(model, entry)")));
  EXPECT_THROW(
      detail::resolve_checkpoint(dir / "missing", cli), FileNotFoundError);
}

// A folder of PyTorch DCP's per-rank shard files is the distributed
// load's (resharding reads the pieces where they lie); every other loader
// says how to load it instead of "no valid checkpoint" alone.
TEST(ResolveTest, DcpsPerRankLayoutIsTheDistributedLoadsAndOthersAreToldSo) {
  const fs::path sharded =
      fs::path(TORCHSER_FIXTURES_DIR) / "dcp" / "world2" / "sharded";
  detail::ResolveOptions distributed;
  distributed.allow_dcp = true;
  const auto found = detail::resolve_checkpoint(sharded, distributed);
  EXPECT_EQ(found.kind, detail::Checkpoint::Kind::kDcpSharded);
  EXPECT_EQ(found.files.size(), 4U);
  EXPECT_THAT(
      [&] { detail::resolve_checkpoint(sharded, detail::ResolveOptions{}); },
      ::testing::ThrowsMessage<ValueError>(::testing::AllOf(
          HasSubstr("does not contain a valid checkpoint"),
          HasSubstr("PyTorch DCP's sharded layout (4 shard-"),
          HasSubstr("distributed load_torch_state_dict"),
          HasSubstr("torchser consolidate " + sharded.string()))));
  torch::nn::Linear model(2, 2);
  EXPECT_THAT(
      [&] { load_torch_model(*model, sharded); },
      ::testing::ThrowsMessage<ValueError>(
          HasSubstr("PyTorch DCP's sharded layout")));
}

} // namespace
} // namespace torchser
