// Per-tensor CRC-32C checksums (SaveOptions::checksums): written where other
// readers ignore them, checked by the loaders and verify, locating a flipped
// bit to its tensor.

#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include <ATen/ops/arange.h>
#include <ATen/ops/ones.h>
#include <torch/nn/module.h>
#include <nlohmann/json.hpp>

#include <torchser/constants.h>
#include <torchser/errors.h>
#include <torchser/load.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"
#include "torchser/detail/checksum.h"
#include "torchser/detail/zip.h"

namespace torchser {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using torchser::testing::read_file;
using torchser::testing::TempDir;
using torchser::testing::write_file;

StateDict three_tensors() {
  return StateDict{
      {"a", at::arange(1000, at::kFloat)},
      {"b", at::arange(10, at::kLong)},
      {"c", at::ones({3, 4}, at::kBFloat16)}};
}

// Where tensor `name`'s bytes start in the safetensors file at `path`.
std::uint64_t data_offset(const fs::path& path, const std::string& name) {
  const std::string bytes = read_file(path);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) {
    n = (n << 8) |
        static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  }
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  return 8 + n + header[name]["data_offsets"][0].get<std::uint64_t>();
}

void flip_bit(const fs::path& path, std::uint64_t offset) {
  std::string bytes = read_file(path);
  bytes[offset] = static_cast<char>(bytes[offset] ^ 0x10);
  write_file(path, bytes);
}

TEST(ChecksumTest, TheCrcIsTheStandardCrc32c) {
  EXPECT_EQ(detail::crc32c("123456789", 9), 0xE3069283U);
  const std::uint32_t first = detail::crc32c("1234", 4);
  EXPECT_EQ(detail::crc32c("56789", 5, first), 0xE3069283U);
}

TEST(ChecksumTest, CombinedCrcsEqualTheCrcOfTheJoinedBytes) {
  std::string bytes;
  for (int i = 0; i < 5000; ++i) {
    bytes.push_back(static_cast<char>((i * 7919) % 251));
  }
  const std::uint32_t whole =
      torchser::detail::crc32c(bytes.data(), bytes.size());
  for (const std::size_t cut : {0, 1, 7, 8, 1000, 4999, 5000}) {
    const std::uint32_t a = torchser::detail::crc32c(bytes.data(), cut);
    const std::uint32_t b =
        torchser::detail::crc32c(bytes.data() + cut, bytes.size() - cut);
    EXPECT_EQ(torchser::detail::crc32c_combine(a, b, bytes.size() - cut), whole)
        << cut;
  }
  // Three parts, folded left to right.
  const std::uint32_t a = torchser::detail::crc32c(bytes.data(), 100);
  const std::uint32_t b = torchser::detail::crc32c(bytes.data() + 100, 900);
  const std::uint32_t c = torchser::detail::crc32c(bytes.data() + 1000, 4000);
  EXPECT_EQ(
      torchser::detail::crc32c_combine(
          torchser::detail::crc32c_combine(a, b, 900), c, 4000),
      whole);
}

// ZIP's CRC-32 (a torch.save record written by several ranks), checked
// against zlib's value for "123456789" and against the direct CRC.
TEST(ChecksumTest, CombinedZipCrcsEqualTheCrcOfTheJoinedBytes) {
  EXPECT_EQ(torchser::detail::crc32(0, "123456789", 9), 0xCBF43926U);
  std::string bytes;
  for (int i = 0; i < 5000; ++i) {
    bytes.push_back(static_cast<char>((i * 7919) % 251));
  }
  const std::uint32_t whole =
      torchser::detail::crc32(0, bytes.data(), bytes.size());
  for (const std::size_t cut : {0, 1, 7, 8, 1000, 4999, 5000}) {
    const std::uint32_t a = torchser::detail::crc32(0, bytes.data(), cut);
    const std::uint32_t b =
        torchser::detail::crc32(0, bytes.data() + cut, bytes.size() - cut);
    EXPECT_EQ(torchser::detail::crc32_combine(a, b, bytes.size() - cut), whole)
        << cut;
    // The other polynomial's combine gives another value.
    if (cut != 0 && cut != bytes.size()) {
      EXPECT_NE(
          torchser::detail::crc32c_combine(a, b, bytes.size() - cut), whole)
          << cut;
    }
  }
}

TEST(ChecksumTest, FilesDifferOnlyByTheMetadataKey) {
  TempDir dir;
  fs::create_directories(dir / "plain");
  fs::create_directories(dir / "summed");
  save_torch_state_dict(three_tensors(), dir / "plain");
  save_torch_state_dict(
      three_tensors(), dir / "summed", SaveOptions().checksums(true));
  const StateDict plain =
      load_state_dict_from_file(dir / "plain/model.safetensors");
  const SafeOpen summed(dir / "summed/model.safetensors");
  ASSERT_TRUE(summed.metadata().has_value());
  const std::string recorded = summed.metadata()->at(kChecksumMetadataKey);
  const auto parsed = nlohmann::json::parse(recorded);
  char expected[9];
  std::snprintf(
      expected,
      sizeof expected,
      "%08x",
      detail::crc32c_of(three_tensors()["a"]));
  EXPECT_EQ(parsed["a"], expected);
  // Without the key, the header is the plain one (the data too).
  const std::string with = read_file(dir / "summed/model.safetensors");
  const std::string without = read_file(dir / "plain/model.safetensors");
  EXPECT_EQ(
      with.substr(with.size() - (1000 * 4 + 80 + 24)),
      without.substr(without.size() - (1000 * 4 + 80 + 24)));
  for (const auto& item : plain) {
    EXPECT_TRUE(summed.get_tensor(item.key()).equal(item.value()));
  }
}

TEST(ChecksumTest, AFlippedBitIsLocatedToItsTensorOnLoadAndVerify) {
  for (const std::int64_t max : {std::int64_t{1}, std::int64_t{1} << 30}) {
    TempDir dir;
    save_torch_state_dict(
        three_tensors(),
        dir.path(),
        SaveOptions().checksums(true).max_shard_size(max));
    const fs::path file = max == 1 ? dir / "model-00001-of-00003.safetensors"
                                   : dir / "model.safetensors";
    struct Three : torch::nn::Module {
      Three() {
        a = register_buffer("a", at::zeros({1000}));
        b = register_buffer("b", at::zeros({10}, at::kLong));
        c = register_buffer("c", at::zeros({3, 4}, at::kBFloat16));
      }
      at::Tensor a, b, c;
    };
    // Whole, it loads checked with every backend (kDirect checks batches
    // it read once).
    for (const auto backend :
         {LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect}) {
      Three whole;
      load_torch_model(whole, dir.path(), LoadOptions().backend(backend));
      EXPECT_TRUE(whole.a.equal(three_tensors()["a"]));
    }
    flip_bit(file, data_offset(file, "a") + 17);
    Three module;
    for (const auto backend :
         {LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect}) {
      try {
        load_torch_model(module, dir.path(), LoadOptions().backend(backend));
        FAIL() << "no error";
      } catch (const OSError& e) {
        EXPECT_THAT(e.what(), HasSubstr("tensor 'a'"));
        EXPECT_THAT(e.what(), HasSubstr(file.filename().string()));
      }
    }
    EXPECT_TRUE(module.b.equal(at::zeros({10}, at::kLong))); // nothing copied
    EXPECT_THROW(load_state_dict_from_file(file), OSError);
    // Opting out, or selecting other tensors, reads the file.
    EXPECT_NO_THROW(load_torch_model(
        module, dir.path(), LoadOptions().verify_checksums(false)));
    EXPECT_NO_THROW(
        load_torch_model(module, dir.path(), LoadOptions().prefixes({"b"})));
    const auto verify = torchser::testing::run_command(
        std::string(TORCHSER_CLI) + " verify '" + dir.path().string() + "'");
    EXPECT_EQ(verify.status, 1) << verify.output;
    EXPECT_THAT(verify.output, HasSubstr("tensor 'a'"));
  }
}

TEST(ChecksumTest, ABadChecksumValueNamesTheTensor) {
  TempDir dir;
  save_file(
      three_tensors(),
      dir / "x.safetensors",
      SafetensorsMetadata{
          {"format", "pt"},
          {kChecksumMetadataKey, R"({"a": "zz", "b": "00000000"})"}});
  try {
    load_state_dict_from_file(dir / "x.safetensors");
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_THAT(e.what(), HasSubstr("tensor 'a'"));
    EXPECT_THAT(e.what(), HasSubstr("\"zz\""));
  }
  save_file(
      three_tensors(),
      dir / "y.safetensors",
      SafetensorsMetadata{
          {"format", "pt"}, {kChecksumMetadataKey, R"({"q": "00000000"})"}});
  EXPECT_THROW(load_state_dict_from_file(dir / "y.safetensors"), ValueError);
  save_file(
      three_tensors(),
      dir / "z.safetensors",
      SafetensorsMetadata{{"format", "pt"}, {kChecksumMetadataKey, "[1]"}});
  EXPECT_THROW(load_state_dict_from_file(dir / "z.safetensors"), ValueError);
}

TEST(ChecksumTest, ASaveNeverCopiesStaleChecksumsFromUserMetadata) {
  TempDir dir;
  Metadata metadata;
  metadata.insert(kChecksumMetadataKey, R"({"a": "00000000"})");
  save_torch_state_dict(
      three_tensors(), dir.path(), SaveOptions().metadata(metadata));
  const SafeOpen file(dir / "model.safetensors");
  EXPECT_EQ(file.metadata()->count(kChecksumMetadataKey), 0U);
  EXPECT_NO_THROW(load_state_dict_from_file(dir / "model.safetensors"));
}

} // namespace
} // namespace torchser
