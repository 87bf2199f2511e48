// save_torch_state_dict / save_torch_model / load_state_dict_from_file /
// load_torch_model (huggingface_hub.md §1.8–1.13, S-09…S-35, §3, §5) and the
// SPEC deviations.

#include <torchser/load.h>
#include <torchser/save.h>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <random>

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <nlohmann/json.hpp>

#include <torchser/module.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/storage.h>

#include "test_utils.h"
#include "torchser/detail/index_json.h"

namespace torchser {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using torchser::testing::TempDir;

// FX-torch: int64 one-element tensors.
// FX-torch of the reference tests.
constexpr auto& torch_state_dict = torchser::testing::fx_torch_state_dict;

constexpr auto& shared_state_dict = torchser::testing::fx_shared_state_dict;

// FX-model: five float parameters of shape [1].
struct DummyModel : torch::nn::Module {
  DummyModel() {
    for (int i = 1; i <= 5; ++i) {
      register_parameter("layer_" + std::to_string(i), at::zeros({1}));
    }
  }
};

std::vector<std::string> files_in(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

void touch(const std::filesystem::path& path, const std::string& content = "") {
  std::ofstream(path, std::ios::binary) << content;
}

// ---------------------------------------------------------------------------
// Saving

TEST(SaveTest, NotShardedWritesOneFileWithFormatMetadata) {
  // S-10, E-02
  TempDir dir;
  save_torch_state_dict(
      torch_state_dict(), dir.path(), SaveOptions().metadata([] {
        Metadata m;
        m.insert("foo", "bar");
        return m;
      }()));
  EXPECT_EQ(
      files_in(dir.path()), std::vector<std::string>{"model.safetensors"});
  const SafeOpen file(dir / "model.safetensors");
  EXPECT_EQ(
      file.metadata(), (SafetensorsMetadata{{"format", "pt"}, {"foo", "bar"}}));
  EXPECT_EQ(file.keys().size(), 5U);
}

TEST(SaveTest, ShardedWritesShardsAndTheReferenceIndexBytes) {
  // S-11, E-01: the index exactly as huggingface_hub writes it.
  TempDir dir;
  Metadata metadata;
  metadata.insert("foo", "bar");
  save_torch_state_dict(
      torch_state_dict(),
      dir.path(),
      SaveOptions().max_shard_size(30).metadata(metadata));
  EXPECT_EQ(
      files_in(dir.path()),
      (std::vector<std::string>{
          "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors",
          "model.safetensors.index.json"}));
  EXPECT_EQ(
      torchser::testing::read_file(dir / "model.safetensors.index.json"),
      "{\n  \"metadata\": {\n    \"total_size\": 40,\n    \"foo\": \"bar\"\n  "
      "},\n  \"weight_map\": {\n"
      "    \"layer_1\": \"model-00001-of-00002.safetensors\",\n"
      "    \"layer_2\": \"model-00001-of-00002.safetensors\",\n"
      "    \"layer_3\": \"model-00001-of-00002.safetensors\",\n"
      "    \"layer_4\": \"model-00002-of-00002.safetensors\",\n"
      "    \"layer_5\": \"model-00002-of-00002.safetensors\"\n  }\n}");
  EXPECT_EQ(
      SafeOpen(dir / "model-00001-of-00002.safetensors").metadata(),
      (SafetensorsMetadata{{"format", "pt"}}));
}

TEST(SaveTest, IndexJsonEscapesLikePython) {
  EXPECT_EQ(
      detail::python_json_string("a\"b\\c\n\x01\x7f/\xc3\xa9\xf0\x9f\x98\x80"),
      "\"a\\\"b\\\\c\\n\\u0001\\u007f/\\u00e9\\ud83d\\ude00\"");
}

TEST(SaveTest, SaveTorchModelEqualsSaveOfItsStateDict) {
  // S-09
  const DummyModel model;
  TempDir a;
  TempDir b;
  save_torch_model(model, a.path(), SaveOptions().max_shard_size(10));
  save_torch_state_dict(
      state_dict(model), b.path(), SaveOptions().max_shard_size(10));
  ASSERT_EQ(files_in(a.path()), files_in(b.path()));
  for (const auto& name : files_in(a.path())) {
    EXPECT_EQ(
        torchser::testing::read_file(a / name),
        torchser::testing::read_file(b / name))
        << name;
  }
}

TEST(SaveTest, UnsafeWritesTorchSaveFiles) {
  // S-12, S-15
  TempDir dir;
  save_torch_state_dict(
      torch_state_dict(), dir.path(), SaveOptions().safe_serialization(false));
  EXPECT_EQ(
      files_in(dir.path()), std::vector<std::string>{"pytorch_model.bin"});
  EXPECT_EQ(
      load_state_dict_from_file(dir / "pytorch_model.bin")["layer_3"]
          .item<int64_t>(),
      30);
  TempDir sharded;
  save_torch_state_dict(
      torch_state_dict(),
      sharded.path(),
      SaveOptions().safe_serialization(false).max_shard_size(30));
  EXPECT_EQ(
      files_in(sharded.path()),
      (std::vector<std::string>{
          "pytorch_model-00001-of-00002.bin",
          "pytorch_model-00002-of-00002.bin",
          "pytorch_model.bin.index.json"}));
}

TEST(SaveTest, SharedLayersAreStoredOnceAndRecordedInMetadata) {
  // S-16
  TempDir dir;
  save_torch_state_dict(shared_state_dict(), dir.path());
  const SafeOpen file(dir / "model.safetensors");
  EXPECT_EQ(
      file.keys(),
      (std::vector<std::string>{"shared_1", "unique_1", "unique_2"}));
  EXPECT_EQ(
      file.metadata(),
      (SafetensorsMetadata{{"format", "pt"}, {"shared_2", "shared_1"}}));
}

TEST(SaveTest, SharedLayersShardedGoToTheIndexMetadata) {
  // S-17, E-03 (without the reference's mutation of the inputs).
  TempDir dir;
  Metadata metadata;
  metadata.insert("user", "x");
  const StateDict sd = shared_state_dict();
  save_torch_state_dict(
      sd, dir.path(), SaveOptions().max_shard_size(2).metadata(metadata));
  const auto index = nlohmann::ordered_json::parse(
      torchser::testing::read_file(dir / "model.safetensors.index.json"));
  EXPECT_EQ(
      index["metadata"].dump(),
      R"({"total_size":24,"user":"x","shared_2":"shared_1"})");
  EXPECT_FALSE(index["weight_map"].contains("shared_2"));
  EXPECT_EQ(sd.size(), 4U); // SPEC deviation 6: the caller's dict is intact
  EXPECT_EQ(metadata.size(), 1U);
}

TEST(SaveTest, DiscardListChoosesTheDroppedName) {
  // S-18, S-19, §3.B-6
  TempDir dir;
  save_torch_state_dict(
      shared_state_dict(),
      dir.path(),
      SaveOptions().shared_tensors_to_discard({"shared_1"}));
  EXPECT_EQ(
      SafeOpen(dir / "model.safetensors").metadata()->at("shared_1"),
      "shared_2");
  // Every complete name discarded: the list is ignored.
  const auto x = at::arange(4, at::kFloat);
  StateDict sd;
  sd.insert("x", x);
  sd.insert("y", x);
  sd.insert("z", x.slice(0, 2));
  const auto dropped = remove_duplicate_names(sd, {"x", "y"});
  ASSERT_EQ(dropped.size(), 1U);
  EXPECT_EQ(dropped.items()[0].key(), "x");
  EXPECT_THAT(dropped.items()[0].value(), ElementsAre("y", "z"));
}

TEST(SaveTest, PartialViewsWithoutAnOwnerAreRuntimeErrors) {
  // E-04, E-05, E-10
  const auto big = at::arange(10, at::kFloat);
  StateDict lone;
  lone.insert("a", big.slice(0, 0, 2));
  TempDir dir;
  EXPECT_THROW_MESSAGE(
      save_torch_state_dict(lone, dir.path()),
      RuntimeError,
      "Error while trying to find names to remove to save state dict, but "
      "found no suitable name to keep for saving "
      "amongst: {'a'}. None is covering the entire storage. Refusing to "
      "save/load the model since you could be storing "
      "much more memory than needed. Please refer to "
      "https://huggingface.co/docs/safetensors/torch_shared_tensors for "
      "more information. Or open an issue.");
  StateDict halves;
  halves.insert("a", big.slice(0, 0, 5));
  halves.insert("b", big.slice(0, 5));
  EXPECT_THROW_CONTAINS(
      save_torch_state_dict(halves, dir.path()),
      RuntimeError,
      "amongst: {'a'}");
  StateDict expanded;
  expanded.insert("e", at::zeros({1}).expand({4}));
  EXPECT_THROW_CONTAINS(
      save_torch_state_dict(expanded, dir.path()),
      RuntimeError,
      "amongst: {'e'}");
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

TEST(SaveTest, FullTensorOwnsItsSlicesAndTransposes) {
  // E-06, E-07 (no view(-1) failure, SPEC deviation 8), E-11
  const auto big = at::arange(10, at::kFloat);
  StateDict sd;
  sd.insert("full", big);
  sd.insert("part", big.slice(0, 2, 4));
  const auto w = at::arange(6, at::kFloat).view({2, 3});
  sd.insert("w", w);
  sd.insert("wt", w.t());
  sd.insert("t", at::arange(6, at::kFloat).view({2, 3}).t());
  TempDir dir;
  save_torch_state_dict(sd, dir.path());
  const SafeOpen file(dir / "model.safetensors");
  EXPECT_EQ(file.keys(), (std::vector<std::string>{"full", "t", "w"}));
  EXPECT_EQ(
      file.metadata(),
      (SafetensorsMetadata{{"format", "pt"}, {"part", "full"}, {"wt", "w"}}));
  EXPECT_TRUE(file.get_tensor("t").equal(
      at::arange(6, at::kFloat).view({2, 3}).t().contiguous()));
}

TEST(SaveTest, OverlapGroupingUsesTheRunningEnd) {
  // E-08 (SPEC deviation 8): C = A[3:4] lies inside A even though B = A[1:2]
  // ends before it; the reference raises M-T12 for {'C'}.
  const auto a = at::arange(10, at::kFloat);
  StateDict sd;
  sd.insert("A", a);
  sd.insert("B", a.slice(0, 1, 2));
  sd.insert("C", a.slice(0, 3, 4));
  const auto dropped = remove_duplicate_names(sd);
  ASSERT_EQ(dropped.size(), 1U);
  EXPECT_EQ(dropped.items()[0].key(), "A");
  EXPECT_THAT(dropped.items()[0].value(), ElementsAre("B", "C"));
}

TEST(SaveTest, EmptyTensorsAreSavedAndNeverShared) {
  // E-14
  StateDict sd;
  sd.insert("a", at::empty({0}));
  sd.insert("b", at::empty({0}));
  TempDir dir;
  save_torch_state_dict(sd, dir.path());
  EXPECT_EQ(
      SafeOpen(dir / "model.safetensors").keys(),
      (std::vector<std::string>{"a", "b"}));
}

TEST(SaveTest, CustomPatternNamesFilesAndIndex) {
  // S-21
  TempDir dir;
  save_torch_state_dict(
      torch_state_dict(),
      dir.path(),
      SaveOptions()
          .filename_pattern("model.variant{suffix}.safetensors")
          .max_shard_size(30));
  EXPECT_EQ(
      files_in(dir.path()),
      (std::vector<std::string>{
          "model.variant-00001-of-00002.safetensors",
          "model.variant-00002-of-00002.safetensors",
          "model.variant.safetensors.index.json"}));
}

TEST(SaveTest, StaleFilesOfThePatternAreRemovedByWholeName) {
  // S-22 and SPEC deviation 3.
  TempDir dir;
  for (const char* name :
       {"model.safetensors",
        "model-00001-of-00003.safetensors",
        "model.safetensors.index.json",
        "model.safetensors.bak",
        "model.safetensorsfoo",
        "modelXsafetensors",
        "pytorch_model.bin",
        "model.variant.safetensors",
        "model-00001-of-00003.safetensors.index.json"}) {
    touch(dir / name);
  }
  std::filesystem::create_directory(
      dir / "model-00002-of-00003.safetensors"); // a directory is left alone
  save_torch_state_dict(
      torch_state_dict(), dir.path(), SaveOptions().max_shard_size(30));
  EXPECT_EQ(
      files_in(dir.path()),
      (std::vector<std::string>{
          "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors",
          "model-00002-of-00003.safetensors",
          "model.safetensors.bak",
          "model.safetensors.index.json",
          "model.safetensorsfoo",
          "model.variant.safetensors",
          "modelXsafetensors",
          "pytorch_model.bin"}));
}

TEST(SaveTest, RegexCharactersInThePatternAreLiteral) {
  TempDir dir;
  touch(dir / "model[v2].safetensors");
  touch(dir / "modelv.safetensors");
  save_torch_state_dict(
      torch_state_dict(),
      dir.path(),
      SaveOptions()
          .filename_pattern("model[v2]{suffix}.safetensors")
          .max_shard_size(30));
  EXPECT_EQ(
      files_in(dir.path()),
      (std::vector<std::string>{
          "model[v2]-00001-of-00002.safetensors",
          "model[v2]-00002-of-00002.safetensors",
          "model[v2].safetensors.index.json",
          "modelv.safetensors"}));
}

TEST(SaveTest, NotMainProcessWritesButNeverDeletes) {
  // S-23
  TempDir dir;
  touch(dir / "model-00001-of-00009.safetensors");
  save_torch_state_dict(
      torch_state_dict(), dir.path(), SaveOptions().is_main_process(false));
  EXPECT_EQ(
      files_in(dir.path()),
      (std::vector<std::string>{
          "model-00001-of-00009.safetensors", "model.safetensors"}));
}

TEST(SaveTest, BadInputsAreValueErrorsAndWriteNothing) {
  TempDir dir;
  touch(dir / "model.safetensors", "old");
  // E-13: the reference deletes the old checkpoint and writes nothing.
  EXPECT_THROW_CONTAINS(
      save_torch_state_dict(StateDict(), dir.path()),
      ValueError,
      "empty state dict");
  // SPEC deviation 5 (E-22)
  Metadata tf;
  tf.insert("format", "tf");
  EXPECT_THROW_CONTAINS(
      save_torch_state_dict(
          torch_state_dict(), dir.path(), SaveOptions().metadata(tf)),
      ValueError,
      "metadata['format'] is 'tf'");
  // SPEC deviation 4
  EXPECT_THROW_CONTAINS(
      save_torch_state_dict(
          torch_state_dict(),
          dir.path(),
          SaveOptions().filename_pattern("my-pattern").max_shard_size(10)),
      ValueError,
      "has no '{suffix}' placeholder");
  EXPECT_EQ(
      files_in(dir.path()), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(torchser::testing::read_file(dir / "model.safetensors"), "old");
  // E-32: the directory must exist.
  EXPECT_THROW(
      save_torch_state_dict(torch_state_dict(), dir / "missing"),
      FileNotFoundError);
}

TEST(SaveTest, InterruptedSaveIsCompletedOrUndone) {
  // SPEC deviation 1: after the commit point the next save/load rolls
  // forward; before it, the temporary files are removed.
  TempDir dir;
  save_torch_state_dict(
      torch_state_dict(), dir.path(), SaveOptions().max_shard_size(30));
  touch(
      dir / "model-00001-of-00002.safetensors.torchser-tmp.abcdef", "partial");
  EXPECT_TRUE(recover_interrupted_save(dir.path()));
  EXPECT_EQ(files_in(dir.path()).size(), 3U);
  // A committed journal whose renames did not all happen.
  StateDict other = torch_state_dict();
  other["layer_1"].fill_(99);
  TempDir staging;
  save_torch_state_dict(
      other, staging.path(), SaveOptions().max_shard_size(30));
  std::filesystem::copy_file(
      staging / "model-00001-of-00002.safetensors",
      dir / "model-00001-of-00002.safetensors.torchser-tmp.XYZ123");
  touch(
      dir / ".torchser-commit.json",
      R"({"version":1,"renames":[["model-00001-of-00002.safetensors.torchser-tmp.XYZ123","model-00001-of-00002.safetensors"]],"remove":[]})");
  DummyModel model;
  load_torch_model(model, dir.path());
  EXPECT_EQ(model.named_parameters()["layer_1"].item<float>(), 99.0F);
  EXPECT_EQ(files_in(dir.path()).size(), 3U);
}

TEST(SaveTest, RecoveryLeavesASaveInProgressAlone) {
  // A save holds a lock on the directory: its temporary files are not
  // leftovers, and a concurrent load must not delete them.
  TempDir dir;
  touch(dir / "model.safetensors.torchser-tmp.inprog");
  const int fd = ::open(dir.path().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_EQ(::flock(fd, LOCK_EX), 0);
  EXPECT_FALSE(recover_interrupted_save(dir.path()));
  EXPECT_TRUE(
      std::filesystem::exists(dir / "model.safetensors.torchser-tmp.inprog"));
  ::close(fd);
  EXPECT_TRUE(recover_interrupted_save(dir.path()));
  EXPECT_FALSE(
      std::filesystem::exists(dir / "model.safetensors.torchser-tmp.inprog"));
}

// ---------------------------------------------------------------------------
// Loading

TEST(LoadTest, StateDictFromEitherFormat) {
  // S-24
  TempDir dir;
  save_torch_state_dict(torch_state_dict(), dir.path());
  save_torch_state_dict(
      torch_state_dict(), dir.path(), SaveOptions().safe_serialization(false));
  for (const char* name : {"model.safetensors", "pytorch_model.bin"}) {
    const StateDict sd = load_state_dict_from_file(dir / name);
    EXPECT_EQ(sd.size(), 5U) << name;
    EXPECT_EQ(sd["layer_2"].item<int64_t>(), 10) << name;
  }
}

TEST(LoadTest, MissingFileAndDirectoryAreFileNotFound) {
  // S-27, E-24
  TempDir dir;
  EXPECT_THROW_MESSAGE(
      load_state_dict_from_file(dir / "x.safetensors"),
      FileNotFoundError,
      "No checkpoint file found at '" + (dir / "x.safetensors").string() +
          "'. Please verify the path is correct and the file has been properly "
          "downloaded.");
  EXPECT_THROW(load_state_dict_from_file(dir.path()), FileNotFoundError);
}

TEST(LoadTest, SafetensorsFormatMetadataIsChecked) {
  // E-22, E-23: metadata without "pt"/"mlx" format is M-T9; none at all is
  // fine.
  TempDir dir;
  StateDict sd;
  sd.insert("a", at::ones({1}));
  save_file(sd, dir / "no_format.safetensors", SafetensorsMetadata{{"a", "b"}});
  save_file(
      sd, dir / "mlx.safetensors", SafetensorsMetadata{{"format", "mlx"}});
  save_file(sd, dir / "none.safetensors");
  EXPECT_THROW_MESSAGE(
      load_state_dict_from_file(dir / "no_format.safetensors"),
      OSError,
      "The safetensors archive passed at " +
          (dir / "no_format.safetensors").string() +
          " does not contain the valid metadata. Make sure you save your model "
          "with the "
          "`save_torch_model` method.");
  EXPECT_EQ(load_state_dict_from_file(dir / "mlx.safetensors").size(), 1U);
  EXPECT_EQ(load_state_dict_from_file(dir / "none.safetensors").size(), 1U);
}

TEST(LoadTest, ModelFromShardedAndSingleCheckpoints) {
  // S-25, S-26, E-20, E-27
  for (const bool safe : {true, false}) {
    for (const int64_t max : {int64_t{30}, int64_t{1000}}) {
      TempDir dir;
      save_torch_state_dict(
          torch_state_dict(),
          dir.path(),
          SaveOptions().safe_serialization(safe).max_shard_size(max));
      DummyModel model;
      const auto before = model.named_parameters()["layer_3"].data_ptr();
      const LoadResult result = load_torch_model(
          model, dir.path(), LoadOptions().safe(safe).strict(true));
      EXPECT_TRUE(result.missing_keys.empty());
      EXPECT_TRUE(result.unexpected_keys.empty());
      EXPECT_EQ(
          model.named_parameters()["layer_3"].item<float>(),
          30.0F); // int64 copied into float32
      EXPECT_EQ(
          model.named_parameters()["layer_3"].data_ptr(),
          before); // no reallocation
    }
  }
}

TEST(LoadTest, MissingPathAndEmptyDirectory) {
  // S-28, S-29, E-25
  DummyModel model;
  TempDir dir;
  EXPECT_THROW_MESSAGE(
      load_torch_model(model, dir / "nope"),
      ValueError,
      "Checkpoint path " + (dir / "nope").string() + " does not exist");
  const std::string m_t4 =
      "Directory '" + dir.path().string() +
      "' does not contain a valid checkpoint. Expected either a sharded "
      "checkpoint with an index file, or a single "
      "model file.";
  EXPECT_THROW_MESSAGE(load_torch_model(model, dir.path()), ValueError, m_t4);
  save_torch_state_dict(torch_state_dict(), dir.path());
  save_torch_state_dict(
      torch_state_dict(),
      dir.path(),
      SaveOptions().filename_pattern("model.variant{suffix}.safetensors"));
  EXPECT_THROW_MESSAGE(load_torch_model(model, dir.path()), ValueError, m_t4);
}

TEST(LoadTest, APickleCheckpointUnderTheSafeDefaultSaysHowToLoadIt) {
  DummyModel model;
  for (const std::int64_t shard : {std::int64_t{16}, std::int64_t{1} << 20}) {
    TempDir dir;
    save_torch_state_dict(
        torch_state_dict(),
        dir.path(),
        SaveOptions().safe_serialization(false).max_shard_size(shard));
    EXPECT_THROW_CONTAINS(
        load_torch_model(model, dir.path()),
        ValueError,
        "pass LoadOptions().safe(false) to load it");
    EXPECT_NO_THROW(
        load_torch_model(model, dir.path(), LoadOptions().safe(false)));
  }
}

TEST(LoadTest, StrictShardedLoadValidatesAgainstTheIndex) {
  // S-30, E-17, E-18 (SPEC deviation 2).
  TempDir dir;
  StateDict sd = torch_state_dict();
  StateDict odd;
  for (const auto& item : sd) {
    if (item.key() != "layer_2") {
      odd.insert(item.key(), item.value());
    }
  }
  odd.insert("extra_b", at::ones({1}));
  odd.insert("extra_a", at::ones({1}));
  save_torch_state_dict(odd, dir.path(), SaveOptions().max_shard_size(30));
  DummyModel model;
  EXPECT_THROW_MESSAGE(
      load_torch_model(model, dir.path(), LoadOptions().strict(true)),
      RuntimeError,
      "Error(s) in loading state_dict for DummyModel\nMissing key(s): "
      "\"layer_2\".\n"
      "Unexpected key(s): \"extra_a\",\"extra_b\".");
  EXPECT_EQ(
      model.named_parameters()["layer_1"].item<float>(),
      0.0F); // nothing was loaded
  const LoadResult result = load_torch_model(model, dir.path());
  EXPECT_EQ(result.missing_keys, std::vector<std::string>{"layer_2"});
  EXPECT_EQ(
      result.unexpected_keys, (std::vector<std::string>{"extra_a", "extra_b"}));
  EXPECT_EQ(model.named_parameters()["layer_1"].item<float>(), 4.0F);
}

TEST(LoadTest, StrictSingleFileUsesPyTorchsMessage) {
  // E-19, E-21
  TempDir dir;
  StateDict odd;
  odd.insert("layer_1", at::ones({2}));
  odd.insert("layer_3", at::ones({1}));
  odd.insert("layer_4", at::ones({1}));
  odd.insert("layer_5", at::ones({1}));
  odd.insert("extra_b", at::ones({1}));
  odd.insert("extra_a", at::ones({1}));
  save_file(
      odd, dir / "model.safetensors", SafetensorsMetadata{{"format", "pt"}});
  DummyModel model;
  EXPECT_THROW_MESSAGE(
      load_torch_model(
          model, dir / "model.safetensors", LoadOptions().strict(true)),
      RuntimeError,
      "Error(s) in loading state_dict for DummyModel:\n\tMissing key(s) in "
      "state_dict: \"layer_2\". \n\t"
      "Unexpected key(s) in state_dict: \"extra_a\", \"extra_b\". \n\tsize "
      "mismatch for layer_1: copying a param "
      "with shape torch.Size([2]) from checkpoint, the shape in current model "
      "is torch.Size([1]).");
  // A size mismatch fails even when not strict, and nothing is copied.
  EXPECT_THROW_CONTAINS(
      load_torch_model(model, dir.path()),
      RuntimeError,
      "size mismatch for layer_1");
  EXPECT_EQ(model.named_parameters()["layer_3"].item<float>(), 0.0F);
}

TEST(LoadTest, FilenamePatternAndIndexSelection) {
  // S-31, S-32: the chosen checkpoint is observed through its values.
  const auto write = [](const std::filesystem::path& dir,
                        const std::string& pattern,
                        bool safe,
                        float value) {
    StateDict sd;
    for (int i = 1; i <= 5; ++i) {
      sd.insert("layer_" + std::to_string(i), at::full({1}, value));
    }
    save_torch_state_dict(
        sd,
        dir,
        SaveOptions()
            .filename_pattern(pattern)
            .safe_serialization(safe)
            .max_shard_size(8));
  };
  const auto loaded = [](const std::filesystem::path& dir,
                         const LoadOptions& options) {
    DummyModel model;
    load_torch_model(model, dir, options);
    return model.named_parameters()["layer_1"].item<float>();
  };
  TempDir a;
  write(a.path(), "model{suffix}.safetensors", true, 1);
  write(a.path(), "pytorch_model{suffix}.bin", false, 2);
  write(a.path(), "model.variant{suffix}.safetensors", true, 3);
  write(a.path(), "model.variant{suffix}.bin", false, 4);
  EXPECT_EQ(loaded(a.path(), LoadOptions()), 1);
  EXPECT_EQ(
      loaded(a.path(), LoadOptions().safe(false)), 1); // safetensors preferred
  EXPECT_EQ(
      loaded(
          a.path(),
          LoadOptions().safe(false).filename_pattern(
              "model.variant{suffix}.safetensors")),
      3);
  EXPECT_EQ(
      loaded(
          a.path(),
          LoadOptions().safe(false).filename_pattern(
              "model.variant{suffix}.bin")),
      4);
  EXPECT_EQ(
      loaded(
          a.path(),
          LoadOptions().safe(true).filename_pattern(
              "model.variant{suffix}.bin")),
      4);
  TempDir b;
  write(b.path(), "pytorch_model{suffix}.bin", false, 2);
  EXPECT_EQ(loaded(b.path(), LoadOptions().safe(false)), 2);
  EXPECT_THROW(loaded(b.path(), LoadOptions()), ValueError);
}

TEST(LoadTest, UnsafeSingleFilePrefersSafetensors) {
  // E-26 (SPEC deviation 7): the reference raises M-T4 here.
  TempDir dir;
  save_torch_state_dict(torch_state_dict(), dir.path());
  DummyModel model;
  EXPECT_TRUE(load_torch_model(model, dir.path(), LoadOptions().safe(false))
                  .missing_keys.empty());
}

void write_index(
    const std::filesystem::path& dir,
    const std::string& index_name,
    const std::string& shard) {
  nlohmann::json index;
  index["metadata"] = nlohmann::json::object();
  index["weight_map"]["layer_1"] = shard;
  touch(dir / index_name, index.dump());
}

TEST(LoadTest, IndexShardNamesAreCheckedBeforeOpening) {
  // S-33, S-34, S-35, E-28…E-30
  TempDir dir;
  DummyModel model;
  const auto index = dir / "model.safetensors.index.json";
  const auto m_t5 = [&](const std::string& shard) {
    return "Invalid shard filename '" + shard + "' in index file '" +
           index.string() +
           "'. Shard filenames must be relative paths without '..' components.";
  };
  for (const std::string shard :
       {"../model.safetensors",
        "/etc/model.safetensors",
        "\\\\server\\x.safetensors",
        "C:\\x.safetensors",
        "c:x.safetensors",
        "1:x.safetensors",
        "./sub/../sub/model.safetensors",
        "sub\\..\\x.safetensors"}) {
    write_index(dir.path(), "model.safetensors.index.json", shard);
    EXPECT_THROW_MESSAGE(
        load_torch_model(model, dir.path()), ValueError, m_t5(shard));
  }
  write_index(dir.path(), "model.safetensors.index.json", "pytorch_model.bin");
  EXPECT_THROW_MESSAGE(
      load_torch_model(model, dir.path()),
      ValueError,
      "Invalid shard filename 'pytorch_model.bin' in index file '" +
          index.string() +
          "'. Expected '.safetensors' extension to match the index format.");
  // A subdirectory shard is fine.
  std::filesystem::create_directory(dir / "sub");
  StateDict sd;
  sd.insert("layer_1", at::full({1}, 7.0));
  save_file(sd, dir / "sub/model.safetensors");
  write_index(
      dir.path(), "model.safetensors.index.json", "sub/model.safetensors");
  const LoadResult result = load_torch_model(model, dir.path());
  EXPECT_EQ(model.named_parameters()["layer_1"].item<float>(), 7.0F);
  EXPECT_EQ(
      result.missing_keys,
      (std::vector<std::string>{"layer_2", "layer_3", "layer_4", "layer_5"}));
}

struct TiedModel : torch::nn::Module {
  explicit TiedModel(bool tie) {
    embed = register_module("embed", torch::nn::Embedding(6, 4));
    head = register_module(
        "head", torch::nn::Linear(torch::nn::LinearOptions(4, 6).bias(false)));
    if (tie) {
      head->weight.set_data(embed->weight);
    }
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear head{nullptr};
};

TEST(LoadTest, TiedWeightsAreReTiedFromTheMetadata) {
  // SPEC deviation 13: "head.weight" was saved as an alias of "embed.weight".
  for (const int64_t max : {int64_t{1}, int64_t{1'000'000}}) {
    TempDir dir;
    const TiedModel source(true);
    save_torch_model(source, dir.path(), SaveOptions().max_shard_size(max));
    TiedModel tied(true);
    const auto result =
        load_torch_model(tied, dir.path(), LoadOptions().strict(true));
    EXPECT_TRUE(result.missing_keys.empty());
    EXPECT_TRUE(tied.head->weight.equal(source.embed->weight));
    EXPECT_EQ(
        get_torch_storage_id(tied.head->weight),
        get_torch_storage_id(tied.embed->weight)); // still tied
    TiedModel untied(false);
    EXPECT_TRUE(load_torch_model(untied, dir.path(), LoadOptions().strict(true))
                    .missing_keys.empty());
    EXPECT_TRUE(untied.head->weight.equal(source.embed->weight));
  }
}

TEST(LoadTest, ReferenceShardedPickleCheckpointLoads) {
  // The checkpoint huggingface_hub wrote (pickle shards + index).
  struct Layers : torch::nn::Module {
    Layers() {
      auto list =
          register_module("layers", std::make_shared<torch::nn::Module>());
      for (int i = 0; i < 6; ++i) {
        auto layer = std::make_shared<torch::nn::Module>();
        layer->register_parameter("weight", at::zeros({8, 8}));
        if (i == 0) {
          layer->register_parameter("bias", at::zeros({8}));
        }
        list->register_module(std::to_string(i), layer);
      }
    }
  };
  Layers model;
  const auto dir =
      torchser::testing::fixtures_dir() / "reference/pickle/sharded";
  const auto result =
      load_torch_model(model, dir, LoadOptions().safe(false).strict(true));
  EXPECT_TRUE(result.missing_keys.empty());
  const auto expected = nlohmann::json::parse(torchser::testing::read_file(
      torchser::testing::fixtures_dir() /
      "reference/pickle/expected.json"))["sharded/"];
  const StateDict sd = state_dict(model);
  for (const char* key :
       {"layers.0.weight", "layers.3.weight", "layers.0.bias"}) {
    const auto values = expected[key]["values"].get<std::vector<float>>();
    EXPECT_TRUE(sd[key].flatten().equal(at::tensor(values))) << key;
  }
}

// ---------------------------------------------------------------------------
// Crash safety: a saver killed at random points, many times.

TEST(CrashSafetyTest, KilledSaveLeavesTheOldOrTheNewCheckpoint) {
  const auto make = [](float value) {
    StateDict sd;
    for (int i = 0; i < 12; ++i) {
      sd.insert(
          "w" + std::to_string(i),
          at::full({4096}, value + static_cast<float>(i)));
    }
    return sd;
  };
  for (const bool safe : {true, false}) {
    TempDir dir;
    save_torch_state_dict(
        make(0),
        dir.path(),
        SaveOptions().safe_serialization(safe).max_shard_size(40000));
    std::mt19937 rng(safe ? 1 : 2);
    float current = 0;
    int interrupted = 0;
    // At least 100 kills per format (issue 8), at random points of the save.
    for (int round = 1; round <= 100; ++round) {
      const float next = static_cast<float>(round * 100);
      const StateDict sd = make(next);
      const pid_t child = ::fork();
      if (child == 0) {
        save_torch_state_dict(
            sd,
            dir.path(),
            SaveOptions().safe_serialization(safe).max_shard_size(40000));
        ::_exit(0);
      }
      ::usleep(std::uniform_int_distribution<int>(0, 4000)(rng));
      ::kill(child, SIGKILL);
      int status = 0;
      ::waitpid(child, &status, 0);
      interrupted += WIFSIGNALED(status) ? 1 : 0;
      // The directory loads as one complete checkpoint: old or new.
      const StateDict loaded = [&] {
        recover_interrupted_save(dir.path());
        struct Twelve : torch::nn::Module {
          Twelve() {
            for (int i = 0; i < 12; ++i) {
              register_parameter("w" + std::to_string(i), at::zeros({4096}));
            }
          }
        } model;
        const auto result = load_torch_model(
            model, dir.path(), LoadOptions().safe(safe).strict(true));
        EXPECT_TRUE(result.missing_keys.empty());
        return state_dict(model);
      }();
      const float base = loaded["w0"][0].item<float>();
      ASSERT_TRUE(base == current || base == next)
          << "round " << round << ": " << base;
      for (int i = 0; i < 12; ++i) {
        ASSERT_EQ(
            loaded["w" + std::to_string(i)][0].item<float>(),
            base + static_cast<float>(i))
            << "round " << round << ": a mix of checkpoints";
      }
      current = base;
      for (const auto& name : files_in(dir.path())) {
        EXPECT_EQ(name.find(".torchser-tmp."), std::string::npos) << name;
      }
    }
    std::cout << "[crash] " << (safe ? "safetensors" : "pickle") << ": "
              << interrupted
              << " of 100 saves killed midway, every directory loaded whole\n";
    EXPECT_GT(interrupted, 0); // some saves really were killed midway
  }
}

} // namespace
} // namespace torchser
