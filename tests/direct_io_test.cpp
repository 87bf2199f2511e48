// The cold-cache reader (LoadBackend::kDirect): its byte ranges against
// pread() of the same file, with both engines (io_uring and the pread thread
// pool); O_DIRECT really bypassing the page cache; every public load path
// with kDirect giving what kMmap gives (safetensors, .bin with shared
// storages, sharded folders, partial and dtype-cast loads, modules, DDUF);
// and files cut short before or during a load as OSErrors naming them.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <set>
#include <string>

#include <ATen/Context.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randn.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/nn/module.h>

#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"
#include "tied_net.h"
#include "torchser/detail/direct_io.h"
#include "torchser/detail/file.h"
#include "torchser/detail/tensor_file.h"
#include "torchser/detail/torch_load_layout.h"

namespace {

using namespace torchser;
using ::testing::HasSubstr;
using torchser::detail::DirectFile;
using torchser::detail::DirectReadOptions;
using torchser::detail::IoEngine;
using torchser::testing::TempDir;
namespace fs = std::filesystem;

// Runs the test body with TORCHSER_IO_ENGINE set, then unsets it.
class EngineScope {
 public:
  explicit EngineScope(IoEngine engine) {
    ::setenv("TORCHSER_IO_ENGINE", torchser::detail::io_engine_name(engine), 1);
  }
  ~EngineScope() {
    ::unsetenv("TORCHSER_IO_ENGINE");
  }
};

std::vector<IoEngine> engines() {
  std::vector<IoEngine> out{IoEngine::kThreads};
  ::unsetenv("TORCHSER_IO_ENGINE");
  if (torchser::detail::default_io_engine() == IoEngine::kIoUring) {
    out.push_back(IoEngine::kIoUring);
  }
  return out;
}

std::string random_bytes(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::string out(n, '\0');
  for (char& c : out) {
    c = static_cast<char>(gen());
  }
  return out;
}

class DirectIoTest : public ::testing::TestWithParam<IoEngine> {
 protected:
  EngineScope engine_{GetParam()};
};

TEST_P(DirectIoTest, RegionsHoldTheFilesBytesWhateverTheirAlignment) {
  TempDir dir;
  const std::string bytes = random_bytes((std::size_t{5} << 20) + 12345, 1);
  torchser::testing::write_file(dir / "f", bytes);
  const DirectFile file(dir / "f", "f");
  EXPECT_EQ(file.engine(), GetParam());
  // Unaligned starts and ends, neighbours sharing a block, a large region
  // across several reads (small blocks), one ending at the file's last byte,
  // an empty one, one repeated.
  const std::vector<DirectFile::Region> regions = {
      {1, 7},
      {8, 4096},
      {4104, 3},
      {100000, 3u << 20},
      {bytes.size() - 5000, 5000},
      {777, 0},
      {8, 4096},
      {(3u << 20) + 100001, 1},
  };
  const auto out =
      file.read_regions(regions, DirectReadOptions{1u << 16, 4, std::nullopt});
  ASSERT_EQ(out.size(), regions.size());
  for (std::size_t i = 0; i < regions.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_EQ(out[i].numel(), static_cast<std::int64_t>(regions[i].nbytes));
    EXPECT_EQ(
        std::string(
            static_cast<const char*>(out[i].data_ptr()), regions[i].nbytes),
        bytes.substr(regions[i].offset, regions[i].nbytes));
  }
}

TEST_P(DirectIoTest, TransfersFillExistingTensorsThroughTheRing) {
  TempDir dir;
  const std::string bytes = random_bytes((std::size_t{3} << 20) + 999, 2);
  torchser::testing::write_file(dir / "f", bytes);
  const DirectFile file(dir / "f", "f");
  std::vector<DirectFile::Transfer> transfers;
  for (const auto& [offset, n] :
       std::vector<std::pair<std::uint64_t, std::int64_t>>{
           {3, 10}, {13, 100000}, {5000, 7}, {2u << 20, 1u << 20}, {0, 0}}) {
    transfers.push_back({offset, at::zeros({n}, at::kByte)});
  }
  std::vector<int> done(transfers.size(), 0);
  // Blocks smaller than a transfer, fewer slots than blocks.
  file.read_into(
      transfers,
      [&](std::size_t i) { ++done[i]; },
      DirectReadOptions{8192, 3, std::nullopt});
  for (std::size_t i = 0; i < transfers.size(); ++i) {
    SCOPED_TRACE(i);
    EXPECT_EQ(done[i], 1);
    const at::Tensor& t = transfers[i].dest;
    EXPECT_EQ(
        std::string(static_cast<const char*>(t.data_ptr()), t.nbytes()),
        bytes.substr(transfers[i].offset, t.nbytes()));
  }
}

TEST_P(DirectIoTest, RangesPastTheEndAreOSErrorsNamingTheFile) {
  TempDir dir;
  torchser::testing::write_file(dir / "short", random_bytes(10000, 3));
  const DirectFile file(dir / "short", "short.safetensors");
  EXPECT_THROW_CONTAINS(
      file.read_regions({{9000, 2000}}), OSError, "short.safetensors");
  EXPECT_THROW_CONTAINS(
      file.read_into(
          {{9000, at::empty({2000}, at::kByte)}}, [](std::size_t) {}),
      OSError,
      "was it truncated?");
}

TEST_P(DirectIoTest, AFileCutShortWhileOpenIsAnOSErrorNotACrash) {
  TempDir dir;
  torchser::testing::write_file(
      dir / "f", random_bytes(std::size_t{4} << 20, 4));
  const DirectFile file(dir / "f", "f.safetensors");
  fs::resize_file(dir / "f", 100000); // rewritten in place by another tool
  EXPECT_THROW_CONTAINS(
      file.read_regions(
          {{0, std::uint64_t{4} << 20}},
          DirectReadOptions{1u << 20, 4, std::nullopt}),
      OSError,
      "was it truncated while being read?");
  EXPECT_THROW_CONTAINS(
      file.read_into(
          {{50000, at::empty({3u << 20}, at::kByte)}},
          [](std::size_t) {},
          DirectReadOptions{1u << 20, 4, std::nullopt}),
      OSError,
      "f.safetensors");
}

INSTANTIATE_TEST_SUITE_P(
    Engines,
    DirectIoTest,
    ::testing::ValuesIn(engines()),
    [](const ::testing::TestParamInfo<IoEngine>& info) {
      return std::string(torchser::detail::io_engine_name(info.param));
    });

TEST(DirectIoEngineTest, AnUnknownEngineIsAValueError) {
  ::setenv("TORCHSER_IO_ENGINE", "aio", 1);
  EXPECT_THROW_CONTAINS(
      torchser::detail::default_io_engine(), ValueError, "'aio'");
  ::unsetenv("TORCHSER_IO_ENGINE");
}

// The fraction of `path`'s pages in the page cache.
double resident(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  struct stat st {};
  ::fstat(fd, &st);
  const auto size = static_cast<std::size_t>(st.st_size);
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  std::vector<unsigned char> in((size + 4095) / 4096);
  ::mincore(map, size, in.data());
  ::munmap(map, size);
  ::close(fd);
  std::size_t n = 0;
  for (const unsigned char c : in) {
    n += c & 1;
  }
  return static_cast<double>(n) / static_cast<double>(in.size());
}

void evict(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

TEST(DirectLoadTest, ColdLoadsBypassThePageCache) {
  TempDir dir;
  StateDict sd;
  for (int i = 0; i < 8; ++i) {
    sd.insert("w" + std::to_string(i), at::rand({256, 1024}));
  }
  save_file(sd, dir / "m.safetensors");
  if (!DirectFile(dir / "m.safetensors", "m").direct()) {
    GTEST_SKIP() << "this filesystem refuses O_DIRECT";
  }
  evict(dir / "m.safetensors");
  if (resident(dir / "m.safetensors") > 0.01) {
    GTEST_SKIP() << "the page cache kept the file after POSIX_FADV_DONTNEED";
  }
  const StateDict got = load_state_dict_from_file(
      dir / "m.safetensors", LoadOptions().backend(LoadBackend::kDirect));
  for (const auto& item : sd) {
    EXPECT_TRUE(at::equal(got[item.key()], item.value())) << item.key();
  }
  // The bytes came straight from the disk: the cache still lacks them (a
  // buffered read would have left 8 MiB there).
  EXPECT_LT(resident(dir / "m.safetensors"), 0.05);
}

void expect_same(const StateDict& got, const StateDict& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& item : want) {
    ASSERT_TRUE(got.contains(item.key())) << item.key();
    EXPECT_EQ(got[item.key()].scalar_type(), item.value().scalar_type())
        << item.key();
    EXPECT_TRUE(at::equal(got[item.key()], item.value())) << item.key();
  }
}

// Tensors of many sizes and dtypes, misaligned in the file by odd-sized
// byte tensors between them.
StateDict mixed() {
  StateDict sd;
  sd.insert("a.big", at::randn({1100, 1000}));
  sd.insert("b.odd", at::arange(7, at::kByte));
  sd.insert("c.half", at::randn({333}).to(at::kHalf));
  sd.insert("d.long", at::arange(1000, at::kLong));
  sd.insert("e.empty", at::empty({0, 4}));
  sd.insert("f.scalar", at::randn({}));
  for (int i = 0; i < 40; ++i) {
    sd.insert("g.small" + std::to_string(i), at::randn({17 + i}));
  }
  return sd;
}

TEST(DirectLoadTest, NewTensorsEqualTheMappedOnesForEveryFormat) {
  TempDir dir;
  const StateDict sd = mixed();
  save_file(sd, dir / "m.safetensors");
  torch_save(sd, dir / "m.bin");
  for (const char* name : {"m.safetensors", "m.bin"}) {
    SCOPED_TRACE(name);
    const auto direct = load_state_dict_from_file(
        dir / name, LoadOptions().backend(LoadBackend::kDirect));
    expect_same(direct, load_state_dict_from_file(dir / name));
    expect_same(direct, sd);
    // Partial, cast and renamed loads read only what they keep.
    const auto partial = load_state_dict_from_file(
        dir / name,
        LoadOptions()
            .backend(LoadBackend::kDirect)
            .prefixes({"a.", "c."})
            .dtype(at::kDouble));
    EXPECT_EQ(partial.keys(), (std::vector<std::string>{"a.big", "c.half"}));
    EXPECT_TRUE(at::equal(partial["c.half"], sd["c.half"].to(at::kDouble)));
  }
  // SafeOpen with kDirect reads one tensor at a time.
  const SafeOpen file(
      dir / "m.safetensors", SafeOpenOptions().backend(LoadBackend::kDirect));
  EXPECT_TRUE(at::equal(file.get_tensor("d.long"), sd["d.long"]));
  EXPECT_TRUE(at::equal(
      file.get_slice("a.big")({SliceIndex(5, 9)}), sd["a.big"].slice(0, 5, 9)));
}

TEST(DirectLoadTest, PickleTensorsOnOneStorageStayOnOne) {
  TempDir dir;
  const at::Tensor base = at::randn({64, 8});
  StateDict sd;
  sd.insert("embed", base);
  sd.insert("head", base);                // tied
  sd.insert("row", base.select(0, 3));    // a view
  sd.insert("cols", base.slice(1, 2, 5)); // a non-contiguous view
  torch_save(sd, dir / "m.bin");
  const auto got = load_state_dict_from_file(
      dir / "m.bin", LoadOptions().backend(LoadBackend::kDirect));
  expect_same(got, sd);
  EXPECT_TRUE(got["embed"].is_alias_of(got["head"]));
  EXPECT_TRUE(got["embed"].is_alias_of(got["cols"]));
  EXPECT_EQ(got["cols"].strides(), sd["cols"].strides());
}

struct Net : torch::nn::Module {
  Net() {
    big = register_parameter("big", at::zeros({1100, 1000}));
    half = register_parameter("half", at::zeros({333}, at::kHalf));
    idx = register_buffer("idx", at::zeros({1000}, at::kLong));
  }
  at::Tensor big, half, idx;
};

StateDict net_state() {
  StateDict sd;
  sd.insert("big", at::randn({1100, 1000}));
  sd.insert("half", at::randn({333}).to(at::kHalf));
  sd.insert("idx", at::arange(1000, at::kLong));
  return sd;
}

TEST(DirectLoadTest, ModulesLoadInPlaceFromEveryLayout) {
  TempDir dir;
  const StateDict sd = net_state();
  fs::create_directories(dir / "st");
  fs::create_directories(dir / "bin");
  save_torch_state_dict(sd, dir / "st", SaveOptions().max_shard_size("2MB"));
  save_torch_state_dict(
      sd,
      dir / "bin",
      SaveOptions().max_shard_size("2MB").safe_serialization(false));
  save_file(sd, dir / "one.safetensors");
  for (const auto& [path, safe] : std::vector<std::pair<fs::path, bool>>{
           {dir / "st", true},
           {dir / "bin", false},
           {dir / "one.safetensors", true}}) {
    SCOPED_TRACE(path.string());
    Net net;
    const void* before = net.big.data_ptr();
    std::vector<std::string> progress;
    const auto result = load_torch_model(
        net,
        path,
        LoadOptions()
            .strict(true)
            .safe(safe)
            .backend(LoadBackend::kDirect)
            .progress(
                [&](const Progress& p) { progress.push_back(p.tensor); }));
    EXPECT_TRUE(result.missing_keys.empty());
    EXPECT_EQ(net.big.data_ptr(), before); // no reallocation
    EXPECT_TRUE(at::equal(net.big, sd["big"]));
    EXPECT_TRUE(at::equal(net.half, sd["half"]));
    EXPECT_TRUE(at::equal(net.idx, sd["idx"]));
    EXPECT_EQ(progress.size(), 3u);
  }
}

TEST(DirectLoadTest, ModuleTensorsOfOtherDtypesOrLayoutsAreConverted) {
  TempDir dir;
  const StateDict sd = net_state();
  save_file(sd, dir / "m.safetensors");
  Net net;
  net.big.set_data(at::zeros({1000, 1100}).t()); // non-contiguous
  net.half.set_data(at::zeros({333}));           // float, the file's half
  const auto result = load_torch_model(
      net, dir / "m.safetensors", LoadOptions().backend(LoadBackend::kDirect));
  EXPECT_TRUE(at::equal(net.big, sd["big"]));
  EXPECT_TRUE(at::equal(net.half, sd["half"].to(at::kFloat)));
  ASSERT_EQ(result.dtype_changes.size(), 1u);
  EXPECT_EQ(result.dtype_changes[0].key, "half");
}

TEST(DirectLoadTest, TiedModulesAndDdufEntriesLoadAsWithMmap) {
  TempDir dir;
  torchser::testing::TiedNet saved;
  fs::create_directories(dir / "tied");
  save_torch_model(saved, dir / "tied");
  torchser::testing::TiedNet loaded;
  const auto result = load_torch_model(
      loaded,
      dir / "tied",
      LoadOptions().strict(true).backend(LoadBackend::kDirect));
  EXPECT_TRUE(result.missing_keys.empty());
  EXPECT_TRUE(at::equal(loaded.embed->weight, saved.embed->weight));
  EXPECT_TRUE(
      loaded.head->weight.is_same(loaded.embed->weight) ||
      loaded.head->weight.is_alias_of(loaded.embed->weight));
  EXPECT_TRUE(at::equal(loaded.norm->running_mean, saved.norm->running_mean));

  // A DDUF entry: the tensors lie at an offset inside the archive.
  export_entries_as_dduf(
      dir / "p.dduf",
      {DDUFExportEntry::from_bytes(
           "model_index.json", R"({"net": ["torchser", "TiedNet"]})"),
       DDUFExportEntry::from_bytes("net/config.json", "{}"),
       DDUFExportEntry::from_state_dict(
           "net/model.safetensors", state_dict(saved))});
  torchser::testing::TiedNet from_dduf;
  const auto entries = read_dduf_file(dir / "p.dduf");
  load_torch_model_from_dduf_entry(
      from_dduf,
      entries["net/model.safetensors"],
      LoadOptions().strict(true).backend(LoadBackend::kDirect));
  for (const auto& item : state_dict(saved)) {
    EXPECT_TRUE(at::equal(state_dict(from_dduf)[item.key()], item.value()))
        << item.key();
  }
}

TEST(DirectLoadTest, ATruncatedShardIsAnOSErrorNamingIt) {
  TempDir dir;
  save_file(net_state(), dir / "m.safetensors");
  const SafeOpen file(
      dir / "m.safetensors", SafeOpenOptions().backend(LoadBackend::kDirect));
  fs::resize_file(dir / "m.safetensors", 5000);
  EXPECT_THROW_CONTAINS((void)file.get_tensor("big"), OSError, "m.safetensors");
  Net net;
  EXPECT_THROW_CONTAINS(
      load_torch_model(
          net,
          dir / "m.safetensors",
          LoadOptions().backend(LoadBackend::kDirect)),
      Error,
      "m.safetensors");
}

// The reader is the file whose header was parsed: a save that renames a new
// file over the path meanwhile (torchser's, huggingface_hub's) changes
// nothing for an open SafeOpen or TensorFile.
TEST(DirectLoadTest, AFileReplacedByRenameAfterOpeningIsStillTheOneRead) {
  TempDir dir;
  const StateDict old_sd = net_state();
  save_file(old_sd, dir / "m.safetensors");
  const SafeOpen file(
      dir / "m.safetensors", SafeOpenOptions().backend(LoadBackend::kDirect));
  torchser::detail::TensorFileOptions direct;
  direct.backend = LoadBackend::kDirect;
  const auto checkpoint_file =
      torchser::detail::open_tensor_file(dir / "m.safetensors", direct);
  StateDict other;
  other.insert("x", at::randn({10}));
  save_file(other, dir / "new.safetensors");
  fs::rename(dir / "new.safetensors", dir / "m.safetensors");
  EXPECT_TRUE(at::equal(file.get_tensor("big"), old_sd["big"]));
  EXPECT_TRUE(at::equal(file.get_tensor("idx"), old_sd["idx"]));
  // The loaders' batch reads too.
  checkpoint_file->prefetch({"big", "half"});
  EXPECT_TRUE(at::equal(checkpoint_file->get("big"), old_sd["big"]));
  EXPECT_TRUE(at::equal(checkpoint_file->get("half"), old_sd["half"]));
  // A .bin: its records are read from the file whose pickle was replayed.
  torch_save(old_sd, dir / "m.bin");
  const auto bin = torchser::detail::open_tensor_file(dir / "m.bin", direct);
  torch_save(other, dir / "new.bin");
  fs::rename(dir / "new.bin", dir / "m.bin");
  EXPECT_TRUE(at::equal(bin->get("big"), old_sd["big"]));
  EXPECT_TRUE(at::equal(bin->get("idx"), old_sd["idx"]));
  // The layout comes from the open file, not from what the path names by
  // then (the window between replaying the pickle and opening the reader).
  torch_save(old_sd, dir / "m.bin");
  const auto opened = torchser::detail::File::open_read(dir / "m.bin");
  torch_save(other, dir / "new.bin");
  fs::rename(dir / "new.bin", dir / "m.bin");
  const PickleValue layout =
      torchser::detail::torch_load_layout(dir / "m.bin", &opened);
  ASSERT_EQ(layout.kind(), PickleValue::Kind::kDict);
  std::set<std::string> keys;
  for (const auto& item : layout.dict_items()) {
    keys.insert(item.first.to_string());
  }
  EXPECT_EQ(keys.count("big"), 1U);
  EXPECT_EQ(keys.count("x"), 0U);
}

TEST(DirectLoadTest, ATruncatedBinIsAnErrorNamingItNeverAFault) {
  TempDir dir;
  torch_save(net_state(), dir / "m.bin");
  fs::resize_file(dir / "m.bin", fs::file_size(dir / "m.bin") / 2);
  EXPECT_THROW_CONTAINS(
      load_state_dict_from_file(
          dir / "m.bin", LoadOptions().backend(LoadBackend::kDirect)),
      Error,
      "m.bin");
}

TEST(DirectLoadTest, CudaModulesLoadThroughThePinnedRing) {
  if (!at::hasCUDA()) {
    GTEST_SKIP() << "no CUDA here: run tests/device/check.sh on a GPU machine";
  }
  TempDir dir;
  const StateDict sd = net_state();
  fs::create_directories(dir / "st");
  save_torch_state_dict(sd, dir / "st", SaveOptions().max_shard_size("2MB"));
  Net net;
  net.to(c10::Device("cuda:0"));
  const void* before = net.big.data_ptr();
  load_torch_model(
      net,
      dir / "st",
      LoadOptions().strict(true).backend(LoadBackend::kDirect));
  EXPECT_EQ(net.big.data_ptr(), before);
  EXPECT_TRUE(at::equal(net.big.cpu(), sd["big"]));
  EXPECT_TRUE(at::equal(net.half.cpu(), sd["half"]));
  const auto got = load_state_dict_from_file(
      dir / "st" / "model-00001-of-00002.safetensors",
      LoadOptions()
          .backend(LoadBackend::kDirect)
          .map_location(c10::Device("cuda:0")));
  for (const auto& item : got) {
    EXPECT_TRUE(item.value().is_cuda());
    EXPECT_TRUE(at::equal(item.value().cpu(), sd[item.key()]));
  }
}

} // namespace
