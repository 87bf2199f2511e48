// Replays, through the fuzz targets, every input that once crashed a fuzzer
// (tests/fuzz/regressions/<target>/, kept after the bug was fixed) and every
// seed, in the normal and the sanitizer builds: a fixed bug stays fixed even
// where clang and libFuzzer are not installed. A target aborts on a broken
// invariant; a sanitizer report or an escaping untyped exception fails too.

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <ATen/ops/arange.h>
#include <gtest/gtest.h>
#include <torchser/dduf.h>
#include <torchser/pickle.h>

#include "fuzz/fuzz_targets.h"
#include "test_utils.h"

namespace {

namespace fs = std::filesystem;

// The same seeds tests/fuzz/run.sh gives libFuzzer.
std::vector<fs::path> seed_dirs(const std::string& target) {
  const fs::path fuzz = TORCHSER_FUZZ_DIR;
  const fs::path fixtures = torchser::testing::fixtures_dir();
  static const std::map<std::string, std::vector<fs::path>> seeds = {
      {"safetensors_header",
       {fuzz / "corpus/safetensors", fixtures / "safetensors-official-2022"}},
      {"safetensors_file",
       {fuzz / "corpus/safetensors", fixtures / "safetensors-official-2022"}},
      {"index_json", {fuzz / "corpus/index_json"}},
      {"dduf", {fixtures / "reference/dduf"}},
      {"torch_load_file",
       {fixtures / "reference/pickle",
        fixtures / "reference/pickle/sharded",
        fixtures / "torch2"}},
      {"pickle_vm", {fuzz / "corpus/pickle_vm"}},
  };
  std::vector<fs::path> dirs = seeds.at(target);
  dirs.push_back(fuzz / "regressions" / target);
  return dirs;
}

TEST(FuzzRegressionTest, EverySavedCrashAndSeedRunsCleanThroughItsTarget) {
  int inputs = 0;
  for (const auto& target : torchser::fuzz::all_targets()) {
    for (const fs::path& dir : seed_dirs(target.name)) {
      if (!fs::is_directory(dir)) {
        continue;
      }
      for (const auto& entry : fs::directory_iterator(dir)) {
        if (!entry.is_regular_file() ||
            (entry.path().extension() == ".json" &&
             target.name != std::string("index_json"))) {
          continue;
        }
        SCOPED_TRACE(std::string(target.name) + " <- " + entry.path().string());
        const std::string bytes = torchser::testing::read_file(entry.path());
        EXPECT_NO_THROW(target.run(
            reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()));
        ++inputs;
      }
    }
  }
  EXPECT_GT(inputs, 20); // the seeds are there
}

// Makes the central directory claim `extra` more uncompressed bytes for the
// entry whose name ends with `suffix` than the entry stores.
void inflate_uncompressed_size(
    const fs::path& archive, const std::string& suffix, std::uint32_t extra) {
  std::string bytes = torchser::testing::read_file(archive);
  bool patched = false;
  for (std::size_t at = bytes.find("PK\x01\x02"); at != std::string::npos;
       at = bytes.find("PK\x01\x02", at + 4)) {
    const auto u16 = [&](std::size_t o) {
      return static_cast<std::uint8_t>(bytes[o]) |
             static_cast<std::uint8_t>(bytes[o + 1]) << 8;
    };
    const std::string name = bytes.substr(at + 46, u16(at + 28));
    if (name.size() >= suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      std::uint32_t size = 0;
      std::memcpy(&size, &bytes[at + 24], 4);
      size += extra;
      std::memcpy(&bytes[at + 24], &size, 4);
      patched = true;
    }
  }
  ASSERT_TRUE(patched) << suffix;
  std::ofstream(archive, std::ios::binary | std::ios::trunc) << bytes;
}

TEST(FuzzRegressionTest, StoredEntriesWhoseSizesDisagreeAreRejected) {
  // The first fuzzing find (torch_load_file and dduf): a stored entry that
  // claims more uncompressed bytes than it stores made torch_load run its
  // pickle machine past the end of the mapping, and read_dduf_file hand out
  // an entry past the end of the archive.
  torchser::testing::TempDir dir;
  torchser::StateDict sd;
  sd.insert("w", at::arange(4, at::kFloat));
  torchser::torch_save(sd, dir.path() / "m.bin");
  inflate_uncompressed_size(dir.path() / "m.bin", "data.pkl", 1 << 24);
  EXPECT_THROW_CONTAINS(
      torchser::torch_load(dir.path() / "m.bin"),
      torchser::UnpicklingError,
      "is stored, but its sizes disagree");

  torchser::export_entries_as_dduf(
      dir.path() / "p.dduf",
      {torchser::DDUFExportEntry::from_bytes("model_index.json", "{}")});
  inflate_uncompressed_size(dir.path() / "p.dduf", "model_index.json", 1 << 24);
  EXPECT_THROW_CONTAINS(
      torchser::read_dduf_file(dir.path() / "p.dduf"),
      torchser::DDUFCorruptedFileError,
      "is stored, but its sizes disagree");
}

} // namespace
