// The safetensors reader: every validation rule of the official reader with
// a hand-made bad file (safetensors.md §1), what it accepts, the official
// 2022 sample files, zero-copy mapping, pread, slices and round trips.

#include <torchser/safetensors.h>

#include <cstring>
#include <fstream>
#include <string>

#include <ATen/Context.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/rand.h>
#include <ATen/ops/randint.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <torchser/errors.h>

#include "test_utils.h"
#include "torchser/detail/torch_version.h"

namespace torchser {
namespace {

using torchser::testing::le64;

using Kind = SafetensorError::Kind;
using ::testing::HasSubstr;

// A file: N (the header's length unless given), the header, the data.
std::string raw(
    const std::string& header,
    const std::string& data = "",
    std::optional<std::uint64_t> n = std::nullopt) {
  return le64(n.value_or(header.size())) + header + data;
}

void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

struct BadFile {
  const char* name;
  std::string bytes;
  Kind kind;
  const char* fragment; // expected in the message
};

std::vector<BadFile> bad_files() {
  const std::string t4 =
      R"("a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]})";
  return {
      {"Empty", "", Kind::kHeaderTooSmall, "header too small"},
      {"SevenBytes",
       std::string(7, '\0'),
       Kind::kHeaderTooSmall,
       "header too small"},
      {"HeaderLengthOverLimit",
       raw("{}", "", 100'000'001),
       Kind::kHeaderTooLarge,
       "header too large"},
      {"HeaderLengthPastEof",
       raw("{}", "", 1000),
       Kind::kInvalidHeaderLength,
       "invalid header length"},
      {"HeaderLengthAlone",
       le64(60),
       Kind::kInvalidHeaderLength,
       "invalid header length"},
      {"InvalidUtf8",
       raw("\xff"),
       Kind::kInvalidHeader,
       "invalid UTF-8 in header"},
      {"ZeroLengthHeader",
       raw(""),
       Kind::kInvalidHeaderDeserialization,
       "invalid JSON in header"},
      {"NulPadding",
       raw(std::string("{}") + std::string(6, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid JSON in header"},
      {"ByteOrderMark",
       raw("\xEF\xBB\xBF{}"),
       Kind::kInvalidHeaderDeserialization,
       "byte-order mark"},
      {"Comment",
       raw("{/*c*/}"),
       Kind::kInvalidHeaderDeserialization,
       "invalid JSON in header"},
      {"TrailingComma",
       raw("{" + t4 + ",}", std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid JSON in header"},
      {"TopLevelArray",
       raw("[]"),
       Kind::kInvalidHeaderDeserialization,
       "expected a JSON object"},
      {"TopLevelString",
       raw("\"x\""),
       Kind::kInvalidHeaderDeserialization,
       "expected a JSON object"},
      {"UnknownDtype",
       raw(R"({"a":{"dtype":"i32","shape":[1],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "unknown variant `i32`, expected one of `BOOL`, `F4`"},
      {"UnknownDtypeF128",
       raw(R"({"a":{"dtype":"F128","shape":[],"data_offsets":[0,16]}})",
           std::string(16, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "unknown variant `F128`"},
      {"NegativeDim",
       raw(R"({"a":{"dtype":"I32","shape":[-1],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid value: integer `-1`, expected usize"},
      {"FloatDim",
       raw(R"({"a":{"dtype":"I32","shape":[1.0],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid type: floating point `1.0`, expected usize"},
      {"ExponentDim",
       raw(R"({"a":{"dtype":"I32","shape":[1e0],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "floating point"},
      {"HugeIntegerOffset",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,18446744073709551616]}})"),
       Kind::kInvalidHeaderDeserialization,
       "floating point"},
      {"ThreeOffsets",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid length 3, expected a tuple of size 2"},
      {"OneOffset",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid length 1"},
      {"OffsetsObject",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":{"b":0}}})"),
       Kind::kInvalidHeaderDeserialization,
       "invalid type: map, expected a sequence"},
      {"MissingShape",
       raw(R"({"a":{"dtype":"I32","data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "missing field `shape` in tensor `a`"},
      {"MissingDtype",
       raw(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "missing field `dtype`"},
      {"TensorNotAnObject",
       raw(R"({"a":1})"),
       Kind::kInvalidHeaderDeserialization,
       "invalid type: integer `1`, expected struct TensorInfo"},
      {"DuplicateField",
       raw(R"({"a":{"dtype":"I32","dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "duplicate field `dtype`"},
      {"MetadataIntegerValue",
       raw(R"({"__metadata__":{"x":1}})"),
       Kind::kInvalidHeaderDeserialization,
       "invalid type: integer `1`, expected a string"},
      {"MetadataNestedValue",
       raw(R"({"__metadata__":{"x":{}}})"),
       Kind::kInvalidHeaderDeserialization,
       "invalid type: map, expected a string"},
      {"MetadataNotAMap",
       raw(R"({"__metadata__":[]})"),
       Kind::kInvalidHeaderDeserialization,
       "expected a map of strings or null"},
      {"DuplicateMetadata",
       raw(R"({"__metadata__":{},"__metadata__":{}})"),
       Kind::kInvalidHeaderDeserialization,
       "duplicate field `__metadata__`"},
      {"DuplicateMetadataKey",
       raw(R"({"__metadata__":{"k":"1","k":"2"}})"),
       Kind::kInvalidHeaderDeserialization,
       "duplicate key `k` in `__metadata__`"},
      {"DuplicateTensorName",
       raw("{" + t4 + "," + t4 + "}", std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "duplicate tensor name `a`"},
      {"TensorNamedMetadata",
       raw(R"({"__metadata__":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "invalid type: sequence, expected a string"},
      {"TooDeep",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4],"x":)" +
               std::string(200, '[') + std::string(200, ']') + "}}",
           std::string(4, '\0')),
       Kind::kInvalidHeaderDeserialization,
       "recursion limit exceeded"},
      {"GapAtStart",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[4,8]}})",
           std::string(8, '\0')),
       Kind::kInvalidOffset,
       "invalid offset for tensor `a`"},
      {"Overlap",
       raw(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kInvalidOffset,
       "invalid offset for tensor `b`"},
      {"EndBeforeBegin",
       raw(R"({"a":{"dtype":"I32","shape":[0],"data_offsets":[4,0]}})",
           std::string(4, '\0')),
       Kind::kInvalidOffset,
       "invalid offset for tensor `a`"},
      {"EmptyTensorInsideAnother",
       raw(R"({"c":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},"d":{"dtype":"I32","shape":[0],"data_offsets":[4,4]}})",
           std::string(8, '\0')),
       Kind::kInvalidOffset,
       "invalid offset for tensor `d`"},
      {"ManyAliasesOfOneRange",
       raw(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
           std::string(16, '\0')),
       Kind::kInvalidOffset,
       "invalid offset for tensor `b`"},
      {"ShapeOverflow",
       raw(R"({"a":{"dtype":"I32","shape":[2,9223372036854775807],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kValidationOverflow,
       "overflow computing buffer size"},
      {"DimPastInt64",
       raw(R"({"a":{"dtype":"I32","shape":[2,18446744073709551614],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kValidationOverflow,
       "overflow computing buffer size"},
      {"F4OddCount",
       raw(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}})",
           std::string(1, '\0')),
       Kind::kMisalignedSlice,
       "does not end up at a byte boundary"},
      {"F4Scalar",
       raw(R"({"a":{"dtype":"F4","shape":[],"data_offsets":[0,1]}})",
           std::string(1, '\0')),
       Kind::kMisalignedSlice,
       "byte boundary"},
      {"SizeMismatch",
       raw(R"({"a":{"dtype":"I32","shape":[2,2],"data_offsets":[0,4]}})",
           std::string(4, '\0')),
       Kind::kTensorInvalidInfo,
       "invalid shape, data type, or offset for tensor"},
      {"TrailingByte",
       raw("{" + t4 + "}", std::string(5, '\0')),
       Kind::kMetadataIncompleteBuffer,
       "incomplete metadata, file not fully covered"},
      {"MissingBytes",
       raw("{" + t4 + "}", std::string(2, '\0')),
       Kind::kMetadataIncompleteBuffer,
       "incomplete download"},
  };
}

class SafetensorsBadFileTest : public ::testing::TestWithParam<BadFile> {};

TEST_P(SafetensorsBadFileTest, FileIsRejectedWithItsRule) {
  const BadFile& bad = GetParam();
  torchser::testing::TempDir dir;
  const auto path = dir / "bad.safetensors";
  write_bytes(path, bad.bytes);
  for (const auto backend :
       {LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect}) {
    try {
      SafeOpen file(path, SafeOpenOptions().backend(backend));
      ADD_FAILURE() << "accepted";
    } catch (const SafetensorError& e) {
      EXPECT_EQ(e.kind(), bad.kind) << e.what();
      EXPECT_THAT(e.what(), HasSubstr(bad.fragment));
      EXPECT_THAT(
          e.what(),
          ::testing::StartsWith("Error while deserializing header: "));
      EXPECT_THAT(e.what(), HasSubstr("file '" + path.string() + "'"));
    }
  }
  // The same bytes in memory.
  try {
    load(bad.bytes);
    ADD_FAILURE() << "load(bytes) accepted";
  } catch (const SafetensorError& e) {
    EXPECT_EQ(e.kind(), bad.kind) << e.what();
    EXPECT_THAT(e.what(), ::testing::StartsWith("Error while deserializing: "));
    EXPECT_THAT(e.what(), HasSubstr("in-memory buffer"));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Rules,
    SafetensorsBadFileTest,
    ::testing::ValuesIn(bad_files()),
    [](const ::testing::TestParamInfo<BadFile>& info) {
      return std::string(info.param.name);
    });

// ---------------------------------------------------------------------------
// What the official reader accepts, torchser accepts.

TEST(SafetensorsReaderTest, AcceptsWhitespaceAroundTheHeader) {
  const std::string t =
      R"("a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]})";
  for (const std::string& header :
       {"{" + t + "}\x0D\x20\x09\x0A", "\x09\x0A{" + t + "}\x0D\x20"}) {
    const auto sd = load(raw(header, std::string("\x07\0\0\0", 4)));
    EXPECT_EQ(sd["a"].item<int>(), 7);
  }
}

TEST(SafetensorsReaderTest, AcceptsNullMetadataExtraFieldsAndEscapedNames) {
  const auto sd = load(raw(
      R"({"__metadata__":null,"\u0061":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"extra":{"x":[1,{"y":null}]}}})",
      "\x01\x02"));
  EXPECT_EQ(sd.keys(), std::vector<std::string>{"a"});
  torchser::testing::TempDir dir;
  write_bytes(dir / "m.safetensors", raw(R"({"__metadata__":null})"));
  EXPECT_FALSE(SafeOpen(dir / "m.safetensors").metadata().has_value());
  write_bytes(dir / "e.safetensors", raw(R"({"__metadata__":{}})"));
  EXPECT_EQ(SafeOpen(dir / "e.safetensors").metadata(), SafetensorsMetadata{});
}

TEST(
    SafetensorsReaderTest,
    AcceptsEmptyTensorsSharingAnOffsetAndAnyHeaderOrder) {
  const auto sd = load(raw(
      R"({"d":{"dtype":"I32","shape":[0],"data_offsets":[4,4]},"c":{"dtype":"I32","shape":[1],"data_offsets":[0,4]},)"
      R"("b":{"dtype":"I32","shape":[2,0],"data_offsets":[0,0]},"a":{"dtype":"I32","shape":[0],"data_offsets":[0,0]}})",
      std::string(4, '\0')));
  // Data order, ties kept in header order.
  EXPECT_EQ(sd.keys(), (std::vector<std::string>{"b", "a", "c", "d"}));
  EXPECT_EQ(sd["b"].sizes(), (std::vector<int64_t>{2, 0}));
}

TEST(SafetensorsReaderTest, AcceptsScalarsAndFilesWithoutTensors) {
  const double pi = 3.25;
  const auto sd = load(
      raw(R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}})",
          std::string(reinterpret_cast<const char*>(&pi), 8)));
  EXPECT_EQ(sd["s"].dim(), 0);
  EXPECT_EQ(sd["s"].item<double>(), 3.25);
  EXPECT_EQ(load(raw("{}      ")).size(), 0U);
}

TEST(SafetensorsReaderTest, F6HasNoTorchDtype) {
  // F6_E2M3 [4] = 24 bits = 3 bytes: a valid file, but no torch type.
  torchser::testing::TempDir dir;
  write_bytes(
      dir / "f6.safetensors",
      raw(R"({"x":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}})",
          "abc"));
  const SafeOpen file(dir / "f6.safetensors");
  EXPECT_EQ(file.keys(), std::vector<std::string>{"x"});
  EXPECT_EQ(file.get_slice("x").get_dtype(), "F6_E2M3");
  try {
    file.get_tensor("x");
    ADD_FAILURE();
  } catch (const SafetensorError& e) {
    EXPECT_EQ(e.kind(), Kind::kUnsupportedDtype);
    EXPECT_THAT(
        e.what(), HasSubstr("safetensors dtype F6_E2M3 has no torch dtype."));
    EXPECT_THAT(e.what(), HasSubstr("tensor `x`"));
  }
}

TEST(SafetensorsReaderTest, UnknownTensorAndMissingFile) {
  torchser::testing::TempDir dir;
  save_file(StateDict(), dir / "x.safetensors");
  const SafeOpen file(dir / "x.safetensors");
  EXPECT_THAT(
      [&] { file.get_tensor("nope"); },
      ::testing::ThrowsMessage<SafetensorError>(
          HasSubstr("File does not contain tensor nope")));
  EXPECT_THROW_CONTAINS(
      SafeOpen(dir / "missing.safetensors"),
      FileNotFoundError,
      "No such file or directory");
  EXPECT_THROW_CONTAINS(SafeOpen(dir.path()), OSError, "Is a directory");
}

// ---------------------------------------------------------------------------
// The official writer's 2022 samples: np.arange(-3, 3) per dtype, metadata
// {"test": "a"}, headers not padded (so the data is misaligned).

class OfficialSamplesTest : public ::testing::TestWithParam<LoadBackend> {};

TEST_P(OfficialSamplesTest, EachFileReadsItsValues) {
  const auto dir =
      torchser::testing::fixtures_dir() / "safetensors-official-2022";
  const std::vector<std::pair<std::string, at::ScalarType>> files = {
      {"B", at::kByte},
      {"b", at::kChar},
      {"d", at::kDouble},
      {"e", at::kHalf},
      {"f", at::kFloat},
      {"h", at::kShort},
      {"i", at::kInt}};
  const auto expected = at::arange(-3, 3, at::kLong);
  for (const auto& [name, dtype] : files) {
    SCOPED_TRACE(name);
    const SafeOpen file(
        dir / (name + ".safetensors"), SafeOpenOptions().backend(GetParam()));
    EXPECT_EQ(file.metadata(), (SafetensorsMetadata{{"test", "a"}}));
    const auto t = file.get_tensor(name);
    EXPECT_EQ(t.scalar_type(), dtype);
    EXPECT_TRUE(t.equal(expected.to(dtype))) << t;
    EXPECT_TRUE(load_file(
                    dir / (name + ".safetensors"),
                    SafeOpenOptions().backend(GetParam()))[name]
                    .equal(t));
  }
}

TEST_P(OfficialSamplesTest, UnsignedWideDtypesNeedNewerLibTorch) {
  const auto dir =
      torchser::testing::fixtures_dir() / "safetensors-official-2022";
  const SafeOpen overall(
      dir / "overall.safetensors", SafeOpenOptions().backend(GetParam()));
  EXPECT_EQ(
      overall.keys(),
      (std::vector<std::string>{"B", "H", "I", "b", "d", "e", "f", "h", "i"}));
  EXPECT_TRUE(overall.get_tensor("f").equal(at::arange(-3, 3, at::kFloat)));
#if !TORCHSER_TORCH_AT_LEAST(2, 3)
  for (const char* name : {"H", "I"}) {
    try {
      overall.get_tensor(name);
      ADD_FAILURE() << name;
    } catch (const SafetensorError& e) {
      EXPECT_EQ(e.kind(), Kind::kUnsupportedDtype);
      EXPECT_THAT(
          e.what(), HasSubstr("is not supported by this LibTorch build"));
      EXPECT_THAT(e.what(), HasSubstr("it needs LibTorch >= 2.3"));
      EXPECT_THAT(e.what(), HasSubstr("overall.safetensors"));
    }
  }
  EXPECT_THROW(load_file(dir / "H.safetensors"), SafetensorError);
#else
  EXPECT_EQ(overall.get_tensor("H").scalar_type(), at::ScalarType::UInt16);
#endif
}

INSTANTIATE_TEST_SUITE_P(
    Backends,
    OfficialSamplesTest,
    ::testing::Values(
        LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect));

// ---------------------------------------------------------------------------
// Round trips, zero copy, slices.

std::vector<at::ScalarType> round_trip_dtypes() {
  return {
      at::kBool,
      at::kByte,
      at::kChar,
      at::kShort,
      at::kInt,
      at::kLong,
      at::kHalf,
      at::kBFloat16,
      at::kFloat,
      at::kDouble,
      at::kComplexFloat};
}

class SafetensorsRoundTripTest : public ::testing::TestWithParam<LoadBackend> {
};

TEST_P(SafetensorsRoundTripTest, EveryDtypeShapeAndName) {
  StateDict sd;
  for (const auto dtype : round_trip_dtypes()) {
    const std::string name = std::string("t.") + c10::toString(dtype);
    sd.insert(name, at::randint(0, 7, {3, 5}, at::kLong).to(dtype));
    sd.insert(name + ".scalar", at::scalar_tensor(1, dtype));
    sd.insert(name + ".empty", at::empty({4, 0, 2}, dtype));
  }
  sd.insert(
      "\xe5\x90\x8d\xe5\x89\x8d/\xc3\xa9\xf0\x9f\x98\x80", at::rand({2, 3}));
  sd.insert("many.dims", at::rand({1, 2, 1, 3, 1, 2, 1, 1, 2, 1}));
  sd.insert("large", at::rand({1024, 1024})); // 4 MiB
  torchser::testing::TempDir dir;
  save_file(sd, dir / "m.safetensors", SafetensorsMetadata{{"format", "pt"}});
  const auto loaded =
      load_file(dir / "m.safetensors", SafeOpenOptions().backend(GetParam()));
  ASSERT_EQ(loaded.size(), sd.size());
  for (const auto& item : sd) {
    SCOPED_TRACE(item.key());
    const at::Tensor& got = loaded[item.key()];
    EXPECT_EQ(got.scalar_type(), item.value().scalar_type());
    EXPECT_EQ(got.sizes(), item.value().sizes());
    EXPECT_TRUE(got.equal(item.value()));
  }
  EXPECT_EQ(
      SafeOpen(dir / "m.safetensors").metadata(),
      (SafetensorsMetadata{{"format", "pt"}}));
  EXPECT_EQ(load(save(sd)).keys(), loaded.keys());
}

TEST_P(SafetensorsRoundTripTest, SlicesOnLeadingDimensions) {
  const auto full = at::arange(2 * 3 * 4, at::kFloat).view({2, 3, 4});
  torchser::testing::TempDir dir;
  StateDict sd;
  sd.insert("x", full);
  save_file(sd, dir / "s.safetensors");
  const SafeOpen file(
      dir / "s.safetensors", SafeOpenOptions().backend(GetParam()));
  const SafeSlice slice = file.get_slice("x");
  EXPECT_EQ(slice.get_shape(), (std::vector<std::int64_t>{2, 3, 4}));
  EXPECT_EQ(slice.get_dtype(), "F32");
  EXPECT_TRUE(slice({}).equal(full));
  EXPECT_TRUE(slice({1}).equal(full[1]));
  EXPECT_TRUE(slice({-1}).equal(full[1]));
  EXPECT_TRUE(slice({SliceIndex(), SliceIndex(1, std::nullopt)})
                  .equal(full.slice(1, 1)));
  EXPECT_TRUE(slice({SliceIndex(0, 1), SliceIndex(1, 3)})
                  .equal(full.slice(0, 0, 1).slice(1, 1, 3)));
  EXPECT_TRUE(slice({1, 2}).equal(full[1][2]));
  EXPECT_TRUE(slice({SliceIndex(std::nullopt, -1), 0, SliceIndex(1, 3)})
                  .equal(full.slice(0, 0, 1).select(1, 0).slice(1, 1, 3)));
  EXPECT_TRUE(slice({SliceIndex(-10, 10)}).equal(full)); // clamped like Python
  EXPECT_EQ(
      slice({SliceIndex(2, 1)}).sizes(), (std::vector<std::int64_t>{0, 3, 4}));
  try {
    slice({0, 0, 0, 0});
    ADD_FAILURE();
  } catch (const SafetensorError& e) {
    EXPECT_EQ(e.kind(), Kind::kInvalidSlice);
    EXPECT_THAT(
        e.what(), HasSubstr("more slicing indexes than dimensions in tensor"));
  }
  EXPECT_THAT(
      [&] {
        slice({SliceIndex(), 3});
      },
      ::testing::ThrowsMessage<SafetensorError>(HasSubstr(
          "index 3 out of bounds for tensor dimension #1 of size 3")));
}

INSTANTIATE_TEST_SUITE_P(
    Backends,
    SafetensorsRoundTripTest,
    ::testing::Values(
        LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect));

TEST(SafetensorsZeroCopyTest, MmapTensorsAreViewsOfOneMapping) {
  torchser::testing::TempDir dir;
  StateDict sd;
  sd.insert("a", at::rand({256}));
  sd.insert("b", at::rand({512}));
  save_file(sd, dir / "z.safetensors");
  const SafeOpen file(dir / "z.safetensors");
  const auto a = file.get_tensor("a");
  const auto b = file.get_tensor("b");
  // a and b sit in one mapping at their offsets (both F32: name order).
  EXPECT_EQ(
      static_cast<char*>(b.data_ptr()) - static_cast<char*>(a.data_ptr()),
      256 * 4);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a.data_ptr()) % 8, 0U);
  const auto pread =
      SafeOpen(
          dir / "z.safetensors", SafeOpenOptions().backend(LoadBackend::kPread))
          .get_tensor("a");
  EXPECT_NE(pread.data_ptr(), a.data_ptr());
  EXPECT_TRUE(pread.equal(a));
}

TEST(SafetensorsZeroCopyTest, MappingOutlivesTheFileAndTheHandle) {
  torchser::testing::TempDir dir;
  const auto original = at::rand({1000});
  StateDict sd;
  sd.insert("w", original);
  save_file(sd, dir / "z.safetensors");
  at::Tensor w;
  {
    const SafeOpen file(dir / "z.safetensors");
    w = file.get_tensor("w");
  }
  std::filesystem::remove(dir / "z.safetensors");
  EXPECT_TRUE(w.equal(original));
}

TEST(SafetensorsZeroCopyTest, WritingIntoAMappedTensorNeverTouchesTheFile) {
  torchser::testing::TempDir dir;
  StateDict sd;
  sd.insert("w", at::zeros({16}));
  save_file(sd, dir / "z.safetensors");
  auto w = load_file(dir / "z.safetensors")["w"];
  w.add_(1);
  EXPECT_TRUE(w.equal(at::ones({16})));
  EXPECT_TRUE(load_file(dir / "z.safetensors")["w"].equal(at::zeros({16})));
}

TEST(SafetensorsZeroCopyTest, SavingOverAMappedFileKeepsTheLiveTensors) {
  // safetensors#762: save_file(load_file(p), p) must not zero the data.
  torchser::testing::TempDir dir;
  const auto path = dir / "z.safetensors";
  StateDict sd;
  sd.insert("w", at::arange(64, at::kFloat));
  save_file(sd, path);
  const auto loaded = load_file(path);
  save_file(loaded, path);
  EXPECT_TRUE(loaded["w"].equal(at::arange(64, at::kFloat)));
  EXPECT_TRUE(load_file(path)["w"].equal(at::arange(64, at::kFloat)));
}

TEST(SafetensorsReaderTest, KeysAreSortedAndOffsetKeysInDataOrder) {
  StateDict sd;
  sd.insert("b", at::zeros({1}, at::kByte));
  sd.insert("a", at::zeros({1}, at::kByte));
  sd.insert("c", at::zeros({1}, at::kDouble));
  torchser::testing::TempDir dir;
  save_file(sd, dir / "k.safetensors");
  const SafeOpen file(dir / "k.safetensors");
  EXPECT_EQ(file.keys(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(file.offset_keys(), (std::vector<std::string>{"c", "a", "b"}));
  EXPECT_TRUE(file.contains("a"));
  EXPECT_FALSE(file.contains("z"));
  EXPECT_EQ(load_file(dir / "k.safetensors").keys(), file.offset_keys());
}

TEST(SafetensorsReaderTest, CudaWithoutCudaBuildIsAClearError) {
  if (at::hasCUDA()) {
    GTEST_SKIP()
        << "this build has CUDA; the device checks run on the GPU machine";
  }
  torchser::testing::TempDir dir;
  StateDict sd;
  sd.insert("w", at::ones({2}));
  save_file(sd, dir / "c.safetensors");
  EXPECT_THROW_CONTAINS(
      load_file(
          dir / "c.safetensors",
          SafeOpenOptions().device(c10::Device("cuda:0"))),
      ValueError,
      "Device cuda:0 was requested, but this LibTorch build has no CUDA "
      "support.");
}

} // namespace
} // namespace torchser
