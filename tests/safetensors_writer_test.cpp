// The safetensors writer: byte-exact with the official Rust writer
// (safetensors.md §3), and its rejections.

#include <torchser/safetensors.h>

#include <cstring>
#include <string>

#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <torchser/errors.h>

#include "test_utils.h"
#include "torchser/detail/file.h"

namespace torchser {
namespace {

using torchser::testing::le64;

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string f32_bytes(std::initializer_list<float> values) {
  std::string out;
  for (const float v : values) {
    out.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  return out;
}

StateDict one(const std::string& name, const at::Tensor& t) {
  StateDict sd;
  sd.insert(name, t);
  return sd;
}

// The header JSON of a serialized buffer, without padding.
std::string header_of(const std::string& bytes) {
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  std::string header = bytes.substr(8, n);
  header.erase(header.find_last_not_of(' ') + 1);
  return header;
}

TEST(SafetensorsWriterTest, GoldenSerialization) {
  // test_serialization: {"attn.0": F32 [1,2,3] = 0..5}, N = 64, no padding.
  const auto bytes =
      save(one("attn.0", at::arange(6, at::kFloat).view({1, 2, 3})));
  const std::string header =
      R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(header.size(), 64U);
  EXPECT_EQ(bytes, le64(64) + header + f32_bytes({0, 1, 2, 3, 4, 5}));
}

TEST(SafetensorsWriterTest, GoldenForcedAlignment) {
  // test_serialization_forced_alignement: 65 JSON bytes + 7 spaces.
  const auto bytes = save(one("attn0", at::zeros({1, 1, 2, 3}, at::kFloat)));
  const std::string header =
      R"({"attn0":{"dtype":"F32","shape":[1,1,2,3],"data_offsets":[0,24]}})";
  ASSERT_EQ(header.size(), 65U);
  EXPECT_EQ(
      bytes, le64(72) + header + std::string(7, ' ') + std::string(24, '\0'));
}

TEST(SafetensorsWriterTest, GoldenEmpty) {
  // test_empty: no tensors, no metadata → 08 00… 7B 7D + 6 spaces.
  EXPECT_EQ(save(StateDict()), le64(8) + "{}" + std::string(6, ' '));
  // With metadata {"framework": "pt"}: N = 40.
  EXPECT_EQ(
      save(StateDict(), SafetensorsMetadata{{"framework", "pt"}}),
      le64(40) + R"({"__metadata__":{"framework":"pt"}})" +
          std::string(5, ' '));
}

TEST(SafetensorsWriterTest, EmptyMetadataWithoutTensorsIsValidJson) {
  // The official writer emits `{},"__metadata__":{}}` here (spec §3.6).
  const auto bytes = save(StateDict(), SafetensorsMetadata{});
  EXPECT_EQ(bytes, le64(24) + R"({"__metadata__":{}})" + std::string(5, ' '));
  EXPECT_EQ(load(bytes).size(), 0U);
}

TEST(SafetensorsWriterTest, AbsentAndEmptyMetadataAreDistinct) {
  const auto t = at::zeros({1}, at::kByte);
  EXPECT_EQ(
      header_of(save(one("a", t))),
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})");
  EXPECT_EQ(
      header_of(save(one("a", t), SafetensorsMetadata{})),
      R"({"__metadata__":{},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})");
}

TEST(SafetensorsWriterTest, MetadataKeysAreSortedByteWise) {
  const SafetensorsMetadata metadata = {
      {"format", "pt"}, {"b", "2"}, {"a", "1"}, {"\xc3\xa9", "e"}, {"Z", "z"}};
  EXPECT_THAT(
      header_of(save(StateDict(), metadata)),
      StartsWith(
          R"({"__metadata__":{"Z":"z","a":"1","b":"2","format":"pt","é":"e"}})"));
}

TEST(SafetensorsWriterTest, SortsByDtypeRankThenNameBytes) {
  // Spec §3.1, restricted to the dtypes every LibTorch build has.
  StateDict sd;
  sd.insert("g", at::zeros({1}, at::kBool));
  sd.insert("z", at::zeros({1}, at::kByte));
  sd.insert("Z", at::zeros({1}, at::kChar));
  sd.insert("e", at::zeros({1}, at::kShort));
  sd.insert("d", at::zeros({1}, at::kHalf));
  sd.insert("c", at::zeros({1}, at::kBFloat16));
  sd.insert("b", at::zeros({1}, at::kFloat));
  sd.insert("a", at::zeros({1}, at::kFloat));
  sd.insert("j", at::zeros({1}, at::kComplexFloat));
  sd.insert("\xc3\xa9", at::zeros({1}, at::kDouble));
  sd.insert("k", at::zeros({1}, at::kLong));
  const SafetensorsWriter writer(sd);
  std::vector<std::string> order;
  for (const auto& t : writer.tensors()) {
    order.push_back(t.name + ":" + safetensors_dtype_name(t.dtype));
  }
  EXPECT_EQ(
      order,
      (std::vector<std::string>{
          "k:I64",
          "\xc3\xa9:F64",
          "j:C64",
          "a:F32",
          "b:F32",
          "c:BF16",
          "d:F16",
          "e:I16",
          "Z:I8",
          "z:U8",
          "g:BOOL"}));
  // Offsets are cumulative with no padding.
  EXPECT_EQ(writer.tensors()[1].begin, 8U);
  EXPECT_EQ(
      writer.tensors().back().end, 8U + 8 + 8 + 4 + 4 + 2 + 2 + 2 + 1 + 1 + 1);
}

TEST(SafetensorsWriterTest, SameDtypeNamesSortByteWise) {
  StateDict sd;
  for (const char* name :
       {"\xc3\xa9", "b", "aa", "a.2", "a.10", "a", "_", "B", "A", "1"}) {
    sd.insert(name, at::zeros({1}, at::kFloat));
  }
  const SafetensorsWriter writer(sd);
  std::vector<std::string> order;
  for (const auto& t : writer.tensors()) {
    order.push_back(t.name);
  }
  EXPECT_EQ(
      order,
      (std::vector<std::string>{
          "1", "A", "B", "_", "a", "a.10", "a.2", "aa", "b", "\xc3\xa9"}));
}

TEST(SafetensorsWriterTest, EscapesLikeSerdeJson) {
  const std::string name = std::string("q\"b\\s/\b\f\n\r\t") +
                           std::string(1, '\0') +
                           "\x0b\x1b\x1f\x7f<>&'\xc3\xa9\xe2\x80\xa8";
  const auto header = header_of(save(one(name, at::zeros({0}, at::kByte))));
  EXPECT_EQ(
      header,
      "{\"q\\\"b\\\\s/"
      "\\b\\f\\n\\r\\t\\u0000\\u000b\\u001b\\u001f\x7f<>&'"
      "\xc3\xa9\xe2\x80\xa8\":"
      "{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}");
  // And it reads back to the same name.
  EXPECT_EQ(
      load(save(one(name, at::zeros({0}, at::kByte)))).keys(),
      std::vector<std::string>{name});
}

TEST(SafetensorsWriterTest, ScalarsAndEmptyTensors) {
  StateDict sd;
  sd.insert("s", at::scalar_tensor(2.5, at::kDouble));
  sd.insert("e", at::empty({2, 0, 3}, at::kFloat));
  EXPECT_EQ(
      header_of(save(sd)),
      R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[2,0,3],"data_offsets":[8,8]}})");
}

TEST(SafetensorsWriterTest, TensorNamedMetadataIsRejected) {
  EXPECT_THROW_CONTAINS(
      save(one("__metadata__", at::zeros({1}))),
      ValueError,
      "A tensor cannot be named `__metadata__`");
}

TEST(SafetensorsWriterTest, DuplicateNamesCannotReachTheWriter) {
  // The writer takes a StateDict, whose insert refuses a second "a".
  StateDict sd;
  sd.insert("a", at::zeros({1}));
  EXPECT_THROW(sd.insert("a", at::ones({1})), c10::Error);
}

TEST(SafetensorsWriterTest, NonContiguousTensorIsRejectedUnlessForced) {
  const auto t = at::arange(6, at::kFloat).view({2, 3}).t();
  EXPECT_THROW_MESSAGE(
      save(one("w", t)),
      ValueError,
      "You are trying to save a non contiguous tensor: `w` which is not "
      "allowed. It either means you are trying to save tensors which are "
      "reference of each other in which case it's recommended to save only "
      "the full tensors, and reslice at load time, or simply call "
      "`.contiguous()` on your tensor to pack it before saving.");
  const auto loaded =
      load(save(one("w", t), std::nullopt, /*force_contiguous=*/true));
  EXPECT_TRUE(loaded["w"].equal(t));
}

TEST(SafetensorsWriterTest, SparseUndefinedMetaAndUnknownDtypesAreRejected) {
  const auto sparse = at::_sparse_coo_tensor_unsafe(
      at::zeros({1, 1}, at::kLong), at::ones({1}), {3});
  EXPECT_THROW_CONTAINS(
      save(one("sp", sparse)),
      ValueError,
      "You are trying to save a sparse tensors: `sp`");
  EXPECT_THROW_CONTAINS(
      save(one("u", at::Tensor())), ValueError, "Tensor 'u' is undefined");
  EXPECT_THROW_CONTAINS(
      save(one("m", at::empty({2}, at::TensorOptions().device(at::kMeta)))),
      ValueError,
      "Tensor 'm' is on the meta device");
  EXPECT_THROW_CONTAINS(
      save(one("c", at::zeros({2}, at::kComplexDouble))),
      ValueError,
      "Tensor 'c': Unknown dtype ComplexDouble: safetensors has no code for "
      "it.");
}

TEST(SafetensorsWriterTest, InvalidUtf8NamesAndMetadataAreRejected) {
  EXPECT_THROW_CONTAINS(
      save(one("bad\xff", at::zeros({1}))), ValueError, "is not valid UTF-8");
  EXPECT_THROW_CONTAINS(
      save(StateDict(), SafetensorsMetadata{{"k", "\xc3"}}),
      ValueError,
      "Metadata value '\\xc3' is not valid UTF-8");
}

TEST(SafetensorsWriterTest, HeaderOver100MBIsRejected) {
  const std::string huge(100'000'001, 'x');
  EXPECT_THAT(
      [&] { SafetensorsWriter(one(huge, at::zeros({1}))); },
      ::testing::ThrowsMessage<SafetensorError>(
          HasSubstr("Error while serializing: header too large")));
}

TEST(SafetensorsWriterTest, StreamsInFileOrderWithDeclaredSize) {
  StateDict sd;
  sd.insert("small", at::ones({3}, at::kByte));
  sd.insert("big", at::arange(4, at::kLong));
  const SafetensorsWriter writer(sd, SafetensorsMetadata{{"format", "pt"}});
  std::string streamed;
  std::vector<std::size_t> chunks;
  writer.write([&](const void* data, std::size_t size) {
    streamed.append(static_cast<const char*>(data), size);
    chunks.push_back(size);
  });
  EXPECT_EQ(streamed.size(), writer.size());
  EXPECT_EQ(streamed, save(sd, SafetensorsMetadata{{"format", "pt"}}));
  // prefix, header, then one chunk per tensor (I64 before U8).
  EXPECT_EQ(
      chunks, (std::vector<std::size_t>{8, writer.header().size(), 32, 3}));
}

TEST(SafetensorsWriterTest, SaveFileReplacesAtomically) {
  torchser::testing::TempDir dir;
  const auto path = dir / "model.safetensors";
  save_file(one("a", at::ones({4})), path);
  // A tensor mapping the old file keeps its data after the file is replaced.
  const auto old = load_file(path);
  save_file(
      one("a", at::zeros({4})), path, SafetensorsMetadata{{"format", "pt"}});
  EXPECT_TRUE(old["a"].equal(at::ones({4})));
  EXPECT_TRUE(load_file(path)["a"].equal(at::zeros({4})));
  // No temporary file is left behind.
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(entry.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"model.safetensors"});
}

TEST(SafetensorsWriterTest, SaveFileIntoMissingDirectoryIsAnOSError) {
  torchser::testing::TempDir dir;
  EXPECT_THROW_CONTAINS(
      save_file(one("a", at::ones({1})), dir / "missing/model.safetensors"),
      FileNotFoundError,
      "Cannot create a temporary file for '" +
          (dir / "missing/model.safetensors").string() + "'");
}

TEST(SafetensorsWriterTest, UncommittedAtomicFileLeavesNothing) {
  torchser::testing::TempDir dir;
  {
    detail::AtomicFile file(dir / "x.safetensors");
    file.write("abc", 3);
    EXPECT_TRUE(std::filesystem::exists(file.temporary_path()));
  }
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

} // namespace
} // namespace torchser
