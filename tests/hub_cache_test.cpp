// Checkpoints in the local Hugging Face cache, laid out as huggingface_hub's
// file_download.py writes them: blobs named by digest, snapshots of symlinks
// into ../../blobs, refs/ holding commit hashes, .no_exist/ markers.

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <torch/nn/modules/linear.h>

#include <torchser/errors.h>
#include <torchser/hub_cache.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/save.h>

#include "cached_repo.h"
#include "test_utils.h"

namespace torchser {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using torchser::testing::add_ref;
using torchser::testing::CachedRepo;
using torchser::testing::kCommitA;
using torchser::testing::kCommitB;
using torchser::testing::linear_values;
using torchser::testing::read_file;
using torchser::testing::ScopedEnv;
using torchser::testing::TempDir;
using torchser::testing::write_file;

float loaded_value(const std::string& reference) {
  torch::nn::Linear linear(3, 2);
  const LoadResult result =
      load_torch_model(*linear, reference, LoadOptions().strict(true));
  EXPECT_TRUE(result.missing_keys.empty()) << reference;
  return linear->bias[0].item<float>();
}

TEST(HubCacheTest, TheCacheFolderFollowsHuggingfaceHubsVariables) {
  ScopedEnv hub("HF_HUB_CACHE", std::nullopt);
  ScopedEnv legacy("HUGGINGFACE_HUB_CACHE", std::nullopt);
  ScopedEnv home("HF_HOME", std::nullopt);
  ScopedEnv xdg("XDG_CACHE_HOME", std::nullopt);
  ScopedEnv user_home("HOME", "/home/u");
  EXPECT_EQ(hf_hub_cache(), fs::path("/home/u/.cache/huggingface/hub"));
  {
    ScopedEnv x("XDG_CACHE_HOME", "/x");
    EXPECT_EQ(hf_hub_cache(), fs::path("/x/huggingface/hub"));
    ScopedEnv h("HF_HOME", "~/hf");
    EXPECT_EQ(hf_hub_cache(), fs::path("/home/u/hf/hub"));
    ScopedEnv l("HUGGINGFACE_HUB_CACHE", "/legacy");
    EXPECT_EQ(hf_hub_cache(), fs::path("/legacy"));
    ScopedEnv c("HF_HUB_CACHE", "$HOME/${XDG_CACHE_HOME}/c");
    EXPECT_EQ(hf_hub_cache(), fs::path("/home/u//x/c"));
  }
}

TEST(HubCacheTest, ReferencesParseAsRepoIdsRevisionsAndFiles) {
  const auto ref = parse_hub_reference("org/name@v1.0/unet/model.safetensors");
  ASSERT_TRUE(ref.has_value());
  EXPECT_EQ(ref->repo_id, "org/name");
  EXPECT_EQ(ref->revision, "v1.0");
  EXPECT_EQ(ref->filename, "unet/model.safetensors");
  const auto plain = parse_hub_reference("org/name/config.json");
  ASSERT_TRUE(plain.has_value());
  EXPECT_EQ(plain->revision, "main");
  EXPECT_EQ(plain->filename, "config.json");
  EXPECT_EQ(parse_hub_reference("gpt2")->repo_id, "gpt2");
  for (const char* not_one :
       {"/abs/path",
        "./rel",
        "../up",
        "~/x",
        "a--b/c",
        "a/../b",
        "org/name@",
        "-org/name",
        "org/name/",
        "org//name",
        "org/name/../../etc"}) {
    EXPECT_FALSE(parse_hub_reference(not_one).has_value()) << not_one;
  }
}

TEST(HubCacheTest, LoadsByRepoBranchTagAndCommit) {
  CachedRepo repo;
  ScopedEnv hub("HF_HUB_CACHE", repo.cache.string());
  EXPECT_EQ(loaded_value("org/tiny"), 1.0F);
  EXPECT_EQ(loaded_value("org/tiny@main"), 1.0F);
  EXPECT_EQ(loaded_value("org/tiny@v1.0"), 2.0F); // sharded, through refs/
  EXPECT_EQ(loaded_value("org/tiny@" + kCommitB), 2.0F);
  const StateDict sd = load_state_dict_from_file("org/tiny/model.safetensors");
  EXPECT_TRUE(sd["bias"].equal(at::full({2}, 1.0F)));
  EXPECT_EQ(
      cached_snapshot("org/tiny", "v1.0"),
      repo.cache / "models--org--tiny/snapshots" / kCommitB);
  EXPECT_EQ(
      cached_file("org/tiny", "config.json", "main", repo.cache),
      repo.cache / "models--org--tiny/snapshots" / kCommitA / "config.json");
}

TEST(HubCacheTest, WhatIsNotCachedIsATypedErrorSayingWhereItLooked) {
  CachedRepo repo;
  ScopedEnv hub("HF_HUB_CACHE", repo.cache.string());
  const auto message = [](const auto& call) -> std::string {
    try {
      call();
    } catch (const LocalEntryNotFoundError& e) {
      return e.what();
    }
    return "no LocalEntryNotFoundError";
  };
  const std::string no_repo = message([] { loaded_value("org/missing@main"); });
  EXPECT_THAT(no_repo, HasSubstr("models--org--missing"));
  EXPECT_THAT(no_repo, HasSubstr(repo.cache.string()));
  // Without a revision, a name the cache lacks is the mistyped local path it
  // looks like (the reference's ValueError), saying where else it looked.
  try {
    loaded_value("org/missing");
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_THAT(
        e.what(), HasSubstr("Checkpoint path org/missing does not exist"));
    EXPECT_THAT(e.what(), HasSubstr("hold a repo 'org/missing'"));
  }
  const std::string no_revision =
      message([] { cached_snapshot("org/tiny", "v2.0"); });
  EXPECT_THAT(no_revision, HasSubstr("revision 'v2.0'"));
  EXPECT_THAT(no_revision, HasSubstr("main -> aaaaaaaaaaaa"));
  EXPECT_THAT(no_revision, HasSubstr("v1.0 -> bbbbbbbbbbbb"));
  const std::string absent =
      message([] { cached_file("org/tiny", "pytorch_model.bin"); });
  EXPECT_THAT(absent, HasSubstr("records that the repo does not have it"));
  const std::string no_file =
      message([] { load_state_dict_from_file("org/tiny/other.safetensors"); });
  EXPECT_THAT(no_file, HasSubstr("config.json, model.safetensors"));
  EXPECT_THROW(cached_file("org/tiny", "../x"), ValueError);
}

TEST(HubCacheTest, SymlinksLeavingTheRepoFolderOrDanglingAreRefused) {
  CachedRepo repo;
  ScopedEnv hub("HF_HUB_CACHE", repo.cache.string());
  const fs::path snapshot =
      repo.cache / "models--org--tiny/snapshots" / kCommitA;
  write_file(repo.dir / "outside.json", "{}");
  fs::create_symlink(repo.dir / "outside.json", snapshot / "evil.json");
  try {
    loaded_value("org/tiny");
    FAIL() << "no error";
  } catch (const OSError& e) {
    EXPECT_THAT(e.what(), HasSubstr("evil.json"));
    EXPECT_THAT(e.what(), HasSubstr("leads outside"));
  }
  fs::remove(snapshot / "evil.json");
  fs::create_symlink("../../blobs/0000", snapshot / "gone.json");
  try {
    cached_snapshot("org/tiny");
    FAIL() << "no error";
  } catch (const OSError& e) {
    EXPECT_THAT(e.what(), HasSubstr("gone.json"));
    EXPECT_THAT(e.what(), HasSubstr("missing blob"));
  }
  // A refs file naming something other than a commit.
  add_ref(repo.cache, "models--org--tiny", "bad", "../../../etc");
  EXPECT_THROW(cached_snapshot("org/tiny", "bad"), OSError);
}

TEST(HubCacheTest, ABareMissingNameKeepsTheFileNotFoundMessage) {
  CachedRepo repo;
  ScopedEnv hub("HF_HUB_CACHE", repo.cache.string());
  try {
    load_state_dict_from_file("missing.safetensors");
    FAIL() << "no error";
  } catch (const LocalEntryNotFoundError& e) {
    FAIL() << "looked in the cache: " << e.what();
  } catch (const FileNotFoundError& e) {
    EXPECT_THAT(e.what(), HasSubstr("No checkpoint file found at"));
  }
  // A bare name the cache holds is that repo.
  fs::create_directories(repo.cache / "models--tiny2/snapshots" / kCommitA);
  save_torch_state_dict(
      linear_values(4.0F), repo.cache / "models--tiny2/snapshots" / kCommitA);
  add_ref(repo.cache, "models--tiny2", "main", kCommitA);
  EXPECT_EQ(loaded_value("tiny2"), 4.0F);
}

TEST(HubCacheTest, ALocalPathWinsOverTheCache) {
  CachedRepo repo;
  ScopedEnv hub("HF_HUB_CACHE", repo.cache.string());
  const fs::path cwd = fs::current_path();
  fs::create_directories(repo.dir / "work/org/tiny");
  save_torch_state_dict(linear_values(7.0F), repo.dir / "work/org/tiny");
  fs::current_path(repo.dir / "work");
  const float local = loaded_value("org/tiny");
  fs::current_path(cwd);
  EXPECT_EQ(local, 7.0F);
}

using CliRun = torchser::testing::CommandRun;

CliRun cli(const fs::path& cache, const std::string& arguments) {
  return torchser::testing::run_command(
      "HF_HUB_CACHE='" + cache.string() + "' " + TORCHSER_CLI + " " +
      arguments);
}

TEST(HubCacheTest, EveryCliCommandTakesARepoAndVerifyChecksTheBlobs) {
  CachedRepo repo;
  const CliRun inspect = cli(repo.cache, "inspect org/tiny@v1.0");
  EXPECT_EQ(inspect.status, 0) << inspect.output;
  EXPECT_THAT(inspect.output, HasSubstr("model-00001-of-00002.safetensors"));
  const CliRun verify = cli(repo.cache, "verify org/tiny");
  EXPECT_EQ(verify.status, 0) << verify.output;
  EXPECT_THAT(verify.output, HasSubstr("2 cached file(s) match"));
  const CliRun file = cli(repo.cache, "verify org/tiny/model.safetensors");
  EXPECT_EQ(file.status, 0) << file.output;
  TempDir out;
  const CliRun convert = cli(
      repo.cache,
      "convert org/tiny@" + kCommitB + " '" + (out / "x.bin").string() + "'");
  EXPECT_EQ(convert.status, 0) << convert.output;
  const CliRun missing = cli(repo.cache, "inspect org/none");
  EXPECT_EQ(missing.status, 1);
  EXPECT_THAT(missing.output, HasSubstr("models--org--none"));

  // One flipped byte in a blob: verify names the file and both digests.
  const fs::path link = repo.cache / "models--org--tiny/snapshots" / kCommitA /
                        "model.safetensors";
  const fs::path blob = fs::canonical(link);
  std::string bytes = read_file(blob);
  bytes[bytes.size() - 1] ^= 1;
  fs::permissions(blob, fs::perms::owner_write, fs::perm_options::add);
  write_file(blob, bytes);
  const CliRun corrupted = cli(repo.cache, "verify org/tiny");
  EXPECT_EQ(corrupted.status, 1) << corrupted.output;
  EXPECT_THAT(corrupted.output, HasSubstr("CORRUPTED: "));
  EXPECT_THAT(corrupted.output, HasSubstr("model.safetensors: its sha256 is"));
  EXPECT_THAT(corrupted.output, HasSubstr(blob.filename().string()));

  // Given its index, a sharded checkpoint's shards are checked too.
  const fs::path shard = fs::canonical(
      repo.cache / "models--org--tiny/snapshots" / kCommitB /
      "model-00002-of-00002.safetensors");
  std::string shard_bytes = read_file(shard);
  shard_bytes[shard_bytes.size() - 1] ^= 1;
  fs::permissions(shard, fs::perms::owner_write, fs::perm_options::add);
  write_file(shard, shard_bytes);
  const CliRun index =
      cli(repo.cache, "verify org/tiny@v1.0/model.safetensors.index.json");
  EXPECT_EQ(index.status, 1) << index.output;
  EXPECT_THAT(index.output, HasSubstr("model-00002-of-00002.safetensors: its"));
}

// `hf download --local-dir` keeps plain files and, per file,
// .cache/huggingface/download/FILE.metadata (commit, etag, time), as
// huggingface_hub's _local_folder.py writes it.
void record_download(
    const fs::path& local_dir, const std::string& file, double timestamp) {
  const fs::path record =
      local_dir / ".cache/huggingface/download" / (file + ".metadata");
  fs::create_directories(record.parent_path());
  write_file(
      record,
      kCommitA + "\n" + torchser::testing::blob_name(local_dir / file) + "\n" +
          std::to_string(timestamp) + "\n");
}

TEST(HubCacheTest, VerifyChecksALocalDirDownloadAgainstItsEtags) {
  TempDir dir;
  const fs::path local = dir / "tiny";
  fs::create_directories(local);
  save_torch_state_dict(linear_values(1.0F), local);
  write_file(local / "config.json", "{}\n");
  const double future = static_cast<double>(std::time(nullptr)) + 1000;
  record_download(local, "model.safetensors", future);
  record_download(local, "config.json", future);
  const auto verify = [&] {
    return torchser::testing::run_command(
        std::string(TORCHSER_CLI) + " verify '" + local.string() + "/'");
  };
  const CliRun ok = verify();
  EXPECT_EQ(ok.status, 0) << ok.output;
  EXPECT_THAT(ok.output, HasSubstr("2 downloaded file(s) match"));
  std::string bytes = read_file(local / "model.safetensors");
  bytes.back() ^= 1;
  write_file(local / "model.safetensors", bytes);
  const CliRun corrupted = verify();
  EXPECT_EQ(corrupted.status, 1) << corrupted.output;
  EXPECT_THAT(corrupted.output, HasSubstr("model.safetensors: its sha256 is"));
  // A file changed after its download is the user's, as huggingface_hub
  // judges it: not checked, and said so.
  record_download(local, "model.safetensors", 1.0);
  const CliRun edited = verify();
  EXPECT_EQ(edited.status, 0) << edited.output;
  EXPECT_THAT(edited.output, HasSubstr("changed after its download"));
}

} // namespace
} // namespace torchser
