// parse_size_to_int, ShardSize, and the shard planners
// (huggingface_hub.md §1.4–1.6, S-01…S-04, S-08, S-20, §3.A, E-15, E-33…E-35).

#include <torchser/split.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ops/_sparse_coo_tensor_unsafe.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <torchser/errors.h>

#include "test_utils.h"

namespace torchser {
namespace {

using ::testing::ElementsAre;
using ::testing::Pair;
using Files = std::vector<std::pair<std::string, std::vector<std::string>>>;
using Owners = std::vector<std::pair<std::string, std::string>>;

Files files_of(const StateDictSplit& split) {
  Files out;
  for (const auto& item : split.filename_to_tensors) {
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

Owners owners_of(const StateDictSplit& split) {
  Owners out;
  for (const auto& item : split.tensor_to_filename) {
    out.emplace_back(item.key(), item.value());
  }
  return out;
}

// FX-dummy: plain lists sized by their sum, storage id always None.
using DummyItem = std::vector<int>;
using DummyStateDict = std::vector<std::pair<std::string, DummyItem>>;

std::int64_t dummy_size(const DummyItem& item) {
  std::int64_t sum = 0;
  for (const int v : item) {
    sum += v;
  }
  return sum;
}

DummyStateDict dummy_state_dict() {
  return {
      {"layer_1", {6}},
      {"layer_2", {10}},
      {"layer_3", {30}},
      {"layer_4", {2}},
      {"layer_5", {2}}};
}

SplitOptions dummy_options(ShardSize max) {
  return SplitOptions()
      .filename_pattern("file{suffix}.dummy")
      .max_shard_size(max);
}

// FX-torch: int64 tensors of one element, 8 bytes each.
// FX-torch of the reference tests.
constexpr auto& torch_state_dict = torchser::testing::fx_torch_state_dict;

// ---------------------------------------------------------------------------
// parse_size_to_int

TEST(ParseSizeToIntTest, UpstreamCases) {
  // S-08
  EXPECT_EQ(parse_size_to_int("1KB"), 1000);
  EXPECT_EQ(parse_size_to_int("2MB"), 2'000'000);
  EXPECT_EQ(parse_size_to_int("3GB"), 3'000'000'000);
  EXPECT_EQ(parse_size_to_int(" 10 KB "), 10'000);
  EXPECT_EQ(parse_size_to_int("20mb"), 20'000'000);
  EXPECT_THROW_CONTAINS(
      parse_size_to_int("1KiB"), ValueError, "Unit 'IB' not supported");
  EXPECT_THROW_CONTAINS(
      parse_size_to_int("1ooKB"), ValueError, "Could not parse the size value");
}

TEST(ParseSizeToIntTest, AcceptsWhatPythonFloatAccepts) {
  // E-33, the verified table of §1.5.
  EXPECT_EQ(parse_size_to_int("5 tb"), 5'000'000'000'000);
  EXPECT_EQ(parse_size_to_int("1.5GB"), 1'500'000'000);
  EXPECT_EQ(parse_size_to_int("1e3KB"), 1'000'000);
  EXPECT_EQ(parse_size_to_int("-1KB"), -1000);
  EXPECT_EQ(parse_size_to_int("0KB"), 0);
  EXPECT_EQ(parse_size_to_int("+5MB"), 5'000'000);
  EXPECT_EQ(parse_size_to_int("1_000KB"), 1'000'000);
  EXPECT_EQ(parse_size_to_int("0.0000001KB"), 0);
  EXPECT_EQ(parse_size_to_int(".5KB"), 500);
  EXPECT_EQ(parse_size_to_int("5.KB"), 5000);
  EXPECT_EQ(parse_size_to_int("1E+2 Kb"), 100'000);
  EXPECT_EQ(parse_size_to_int("2.5e-1MB"), 250'000);
  EXPECT_EQ(parse_size_to_int("1e-400GB"), 0);  // float() underflows to 0.0
  EXPECT_EQ(parse_size_to_int("-0.0009KB"), 0); // int() truncates toward zero
  EXPECT_EQ(parse_size_to_int("0.0019KB"), 1);
}

TEST(ParseSizeToIntTest, UnknownUnitMessage) {
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("1KiB"),
      ValueError,
      "Unit 'IB' not supported. Supported units are TB, GB, MB, KB. Got "
      "'1KiB'.");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("5GiB"),
      ValueError,
      "Unit 'IB' not supported. Supported units are TB, GB, MB, KB. Got "
      "'5GiB'.");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("5B"),
      ValueError,
      "Unit '5B' not supported. Supported units are TB, GB, MB, KB. Got '5B'.");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("B"),
      ValueError,
      "Unit 'B' not supported. Supported units are TB, GB, MB, KB. Got 'B'.");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("  "),
      ValueError,
      "Unit '' not supported. Supported units are TB, GB, MB, KB. Got ''.");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int(" 12 "),
      ValueError,
      "Unit '12' not supported. Supported units are TB, GB, MB, KB. Got '12'.");
}

TEST(ParseSizeToIntTest, UnparsableNumberMessage) {
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("1ooKB"),
      ValueError,
      "Could not parse the size value from '1ooKB': could not convert string "
      "to float: '1oo'");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("KB"),
      ValueError,
      "Could not parse the size value from 'KB': could not convert string to "
      "float: ''");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("it's 5GB"),
      ValueError,
      "Could not parse the size value from 'it's 5GB': could not convert "
      "string to float: \"it's 5\"");
  // Underscores only between digits, as in Python.
  for (const char* bad :
       {"1__0KB",
        "_1KB",
        "1_KB",
        "1._5KB",
        "1e_5KB",
        "--1KB",
        "1e KB",
        ".KB",
        "0x10KB",
        "1 0KB"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW_CONTAINS(
        parse_size_to_int(bad),
        ValueError,
        "Could not parse the size value from");
  }
}

TEST(ParseSizeToIntTest, InfinityNanAndHugeValuesAreValueErrors) {
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("inf GB"),
      ValueError,
      "cannot convert float infinity to integer (size 'inf GB')");
  EXPECT_THROW_CONTAINS(
      parse_size_to_int("-Infinity KB"), ValueError, "infinity");
  EXPECT_THROW_CONTAINS(parse_size_to_int("1e999KB"), ValueError, "infinity");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("nan MB"),
      ValueError,
      "cannot convert float NaN to integer (size 'nan MB')");
  EXPECT_THROW_MESSAGE(
      parse_size_to_int("1e7TB"),
      ValueError,
      "Size '1e7TB' is too large: it does not fit in a 64-bit byte count.");
  EXPECT_EQ(parse_size_to_int("9e6TB"), 9'000'000'000'000'000'000);
}

// ---------------------------------------------------------------------------
// ShardSize

TEST(ShardSizeTest, AcceptsBytesAndSizeStrings) {
  EXPECT_EQ(ShardSize(100).bytes(), 100);
  EXPECT_EQ(ShardSize(std::uint64_t{7}).bytes(), 7);
  EXPECT_EQ(ShardSize("5GB").bytes(), 5'000'000'000);
  EXPECT_EQ(ShardSize(std::string("2KB")).bytes(), 2000);
  EXPECT_EQ(ShardSize(std::string_view("0.5KB")).bytes(), 500);
  EXPECT_EQ(ShardSize("500MB"), ShardSize(500'000'000));
  EXPECT_EQ(SplitOptions().max_shard_size().bytes(), kMaxShardSize);
}

TEST(ShardSizeTest, BadStringThrowsAtTheCallSite) {
  EXPECT_THROW_CONTAINS(
      SplitOptions().max_shard_size("5GiB"),
      ValueError,
      "Unit 'IB' not supported");
}

TEST(ShardSizeTest, ZeroAndNegativeSizesAreValueErrors) {
  EXPECT_THROW_MESSAGE(
      ShardSize(0),
      ValueError,
      "max_shard_size must be a positive number of bytes, got 0.");
  EXPECT_THROW_CONTAINS(ShardSize(-5), ValueError, "got -5.");
  // The reference parses these to 0 / -1000 and plans one shard per tensor.
  EXPECT_THROW_MESSAGE(
      ShardSize("0.00001KB"),
      ValueError,
      "max_shard_size must be a positive number of bytes, got 0 from "
      "'0.00001KB'.");
  EXPECT_THROW_CONTAINS(ShardSize("-1KB"), ValueError, "got -1000 from '-1KB'");
  EXPECT_THROW_CONTAINS(
      ShardSize(std::uint64_t{1} << 63),
      ValueError,
      "does not fit in a 64-bit signed byte count");
}

// ---------------------------------------------------------------------------
// The generic factory

TEST(SplitFactoryTest, SingleShard) {
  // S-01
  const auto split = split_state_dict_into_shards_factory(
      dummy_state_dict(), dummy_size, NoStorageId{}, dummy_options(100));
  EXPECT_FALSE(split.is_sharded);
  EXPECT_THAT(
      files_of(split),
      ElementsAre(Pair(
          "file.dummy",
          ElementsAre("layer_1", "layer_2", "layer_3", "layer_4", "layer_5"))));
  EXPECT_THAT(
      owners_of(split),
      ElementsAre(
          Pair("layer_1", "file.dummy"),
          Pair("layer_2", "file.dummy"),
          Pair("layer_3", "file.dummy"),
          Pair("layer_4", "file.dummy"),
          Pair("layer_5", "file.dummy")));
  EXPECT_EQ(split.metadata.total_size, 50);
}

TEST(SplitFactoryTest, OversizeTensorIsPushedAheadOfTheOpenShard) {
  // S-02
  const auto split = split_state_dict_into_shards_factory(
      dummy_state_dict(), dummy_size, NoStorageId{}, dummy_options(10));
  EXPECT_TRUE(split.is_sharded);
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair("file-00001-of-00004.dummy", ElementsAre("layer_1")),
          Pair("file-00002-of-00004.dummy", ElementsAre("layer_3")),
          Pair("file-00003-of-00004.dummy", ElementsAre("layer_2")),
          Pair(
              "file-00004-of-00004.dummy", ElementsAre("layer_4", "layer_5"))));
  EXPECT_THAT(
      owners_of(split),
      ElementsAre(
          Pair("layer_1", "file-00001-of-00004.dummy"),
          Pair("layer_3", "file-00002-of-00004.dummy"),
          Pair("layer_2", "file-00003-of-00004.dummy"),
          Pair("layer_4", "file-00004-of-00004.dummy"),
          Pair("layer_5", "file-00004-of-00004.dummy")));
  EXPECT_EQ(split.metadata.total_size, 50);
}

TEST(SplitFactoryTest, TensorsOfOneStorageStayWithTheFirstKey) {
  // S-03: the storage id is the first element.
  const DummyStateDict sd = {
      {"layer_1", {1}},
      {"layer_2", {2}},
      {"layer_3", {1}},
      {"layer_4", {2}},
      {"layer_5", {1}}};
  const auto split = split_state_dict_into_shards_factory(
      sd,
      dummy_size,
      [](const DummyItem& item) { return std::optional<int>(item[0]); },
      SplitOptions().max_shard_size(1));
  EXPECT_TRUE(split.is_sharded);
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair(
              "model-00001-of-00002.safetensors",
              ElementsAre("layer_2", "layer_4")),
          Pair(
              "model-00002-of-00002.safetensors",
              ElementsAre("layer_1", "layer_3", "layer_5"))));
  EXPECT_THAT(
      owners_of(split),
      ElementsAre(
          Pair("layer_2", "model-00001-of-00002.safetensors"),
          Pair("layer_4", "model-00001-of-00002.safetensors"),
          Pair("layer_1", "model-00002-of-00002.safetensors"),
          Pair("layer_3", "model-00002-of-00002.safetensors"),
          Pair("layer_5", "model-00002-of-00002.safetensors")));
  EXPECT_EQ(split.metadata.total_size, 3);
}

TEST(SplitFactoryTest, NonTensorEntriesAreSkipped) {
  // S-04: a size callable returning nullopt marks bnb-style string entries.
  using Item = std::variant<DummyItem, std::string>;
  const std::vector<std::pair<std::string, Item>> sd = {
      {"layer_1", DummyItem{6}},
      {"bnb_string", std::string("quantization_metadata")},
      {"layer_2", DummyItem{10}}};
  int size_calls = 0;
  const auto split = split_state_dict_into_shards_factory(
      sd,
      [&](const Item& item) -> std::optional<std::int64_t> {
        ++size_calls;
        if (std::holds_alternative<std::string>(item)) {
          return std::nullopt;
        }
        return dummy_size(std::get<DummyItem>(item));
      },
      NoStorageId{},
      dummy_options(100));
  EXPECT_FALSE(split.is_sharded);
  EXPECT_THAT(
      files_of(split),
      ElementsAre(Pair("file.dummy", ElementsAre("layer_1", "layer_2"))));
  EXPECT_THAT(
      owners_of(split),
      ElementsAre(
          Pair("layer_1", "file.dummy"), Pair("layer_2", "file.dummy")));
  EXPECT_EQ(split.metadata.total_size, 16);
  EXPECT_EQ(size_calls, 3);
}

TEST(SplitFactoryTest, SharedWrapperSubclassesReplayedWithSyntheticIds) {
  // S-20, with TwoTensor's ids and sizes replayed: layer_1..5 distinct, 8
  // bytes; layer_6 id A, 16 bytes; ts_shared_1/2 id B, 16 bytes; max 32.
  struct Item {
    std::int64_t size;
    std::optional<std::string> id;
  };
  const std::vector<std::pair<std::string, Item>> sd = {
      {"layer_1", {8, "1"}},
      {"layer_2", {8, "2"}},
      {"layer_3", {8, "3"}},
      {"layer_4", {8, "4"}},
      {"layer_5", {8, "5"}},
      {"layer_6", {16, "A"}},
      {"ts_shared_1", {16, "B"}},
      {"ts_shared_2", {16, "B"}}};
  const auto split = split_state_dict_into_shards_factory(
      sd,
      [](const Item& i) { return i.size; },
      [](const Item& i) { return i.id; },
      SplitOptions()
          .filename_pattern("pytorch_model{suffix}.bin")
          .max_shard_size(32));
  EXPECT_TRUE(split.is_sharded);
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair(
              "pytorch_model-00001-of-00003.bin",
              ElementsAre("layer_1", "layer_2", "layer_3", "layer_4")),
          Pair(
              "pytorch_model-00002-of-00003.bin",
              ElementsAre("layer_5", "layer_6")),
          Pair(
              "pytorch_model-00003-of-00003.bin",
              ElementsAre("ts_shared_1", "ts_shared_2"))));
  EXPECT_EQ(split.metadata.total_size, 72);
}

TEST(SplitFactoryTest, GreedyInKeyOrderWithoutBinPacking) {
  // §3.A-1, the docstring example: [6,6,2,6,2,2] with limit 10.
  const DummyStateDict sd = {
      {"a", {6}}, {"b", {6}}, {"c", {2}}, {"d", {6}}, {"e", {2}}, {"f", {2}}};
  const auto split = split_state_dict_into_shards_factory(
      sd, dummy_size, NoStorageId{}, dummy_options(10));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair("file-00001-of-00003.dummy", ElementsAre("a")),
          Pair("file-00002-of-00003.dummy", ElementsAre("b", "c")),
          Pair("file-00003-of-00003.dummy", ElementsAre("d", "e", "f"))));
}

TEST(SplitFactoryTest, ShardMayReachExactlyTheMaximum) {
  // §3.A-2 and E-35: 5, 5, 1 with max 10; a tensor of exactly max is not
  // oversize.
  const DummyStateDict sd = {{"a", {5}}, {"b", {5}}, {"c", {1}}};
  EXPECT_THAT(
      files_of(split_state_dict_into_shards_factory(
          sd, dummy_size, NoStorageId{}, dummy_options(10))),
      ElementsAre(
          Pair("file-00001-of-00002.dummy", ElementsAre("a", "b")),
          Pair("file-00002-of-00002.dummy", ElementsAre("c"))));
  const DummyStateDict exact = {{"a", {10}}, {"b", {1}}};
  EXPECT_THAT(
      files_of(split_state_dict_into_shards_factory(
          exact, dummy_size, NoStorageId{}, dummy_options(10))),
      ElementsAre(
          Pair("file-00001-of-00002.dummy", ElementsAre("a")),
          Pair("file-00002-of-00002.dummy", ElementsAre("b"))));
}

TEST(SplitFactoryTest, AliasesOfAnOversizeTensorJoinItsShard) {
  // §3.A-4 / E-34: {big(50, id X), small(5), big_alias(id X)}, max 10.
  struct Item {
    std::int64_t size;
    std::optional<char> id;
  };
  const std::vector<std::pair<std::string, Item>> sd = {
      {"big", {50, 'X'}},
      {"small", {5, std::nullopt}},
      {"big_alias", {50, 'X'}}};
  const auto split = split_state_dict_into_shards_factory(
      sd,
      [](const Item& i) { return i.size; },
      [](const Item& i) { return i.id; },
      SplitOptions().filename_pattern("m{suffix}").max_shard_size(10));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair("m-00001-of-00002", ElementsAre("big", "big_alias")),
          Pair("m-00002-of-00002", ElementsAre("small"))));
  EXPECT_EQ(split.metadata.total_size, 55);
}

TEST(SplitFactoryTest, AliasesJoinStorageByStorageInFirstSeenOrder) {
  // Python walks storage_id_to_tensors in first-seen order, so within one
  // shard the aliases of the earlier storage come first, whatever the key
  // order of the aliases themselves.
  struct Item {
    std::int64_t size;
    int id;
  };
  const std::vector<std::pair<std::string, Item>> sd = {
      {"p", {1, 1}},
      {"q", {1, 2}},
      {"q_alias", {1, 2}},
      {"p_alias", {1, 1}},
      {"q_alias2", {1, 2}}};
  const auto split = split_state_dict_into_shards_factory(
      sd,
      [](const Item& i) { return i.size; },
      [](const Item& i) { return std::optional<int>(i.id); },
      SplitOptions());
  EXPECT_THAT(
      files_of(split),
      ElementsAre(Pair(
          "model.safetensors",
          ElementsAre("p", "q", "p_alias", "q_alias", "q_alias2"))));
  EXPECT_EQ(split.metadata.total_size, 2);
}

TEST(SplitFactoryTest, SingleOversizeTensorGetsTheUnsuffixedName) {
  // §3.A-8
  const DummyStateDict sd = {{"huge", {500}}};
  const auto split = split_state_dict_into_shards_factory(
      sd, dummy_size, NoStorageId{}, dummy_options(10));
  EXPECT_FALSE(split.is_sharded);
  EXPECT_THAT(
      files_of(split), ElementsAre(Pair("file.dummy", ElementsAre("huge"))));
}

TEST(SplitFactoryTest, SuffixWidthGrowsPastFiveDigits) {
  // §3.A-10: %05d is a minimum width.
  DummyStateDict sd;
  for (int i = 0; i < 100'001; ++i) {
    sd.emplace_back("t" + std::to_string(i), DummyItem{1});
  }
  const auto split = split_state_dict_into_shards_factory(
      sd, dummy_size, NoStorageId{}, dummy_options(1));
  ASSERT_EQ(split.filename_to_tensors.size(), 100'001U);
  EXPECT_EQ(
      split.filename_to_tensors.items().front().key(),
      "file-00001-of-100001.dummy");
  EXPECT_EQ(
      split.filename_to_tensors.items().back().key(),
      "file-100001-of-100001.dummy");
  EXPECT_EQ(split.tensor_to_filename["t99999"], "file-100000-of-100001.dummy");
}

TEST(SplitFactoryTest, WorksOverOrderedDictAndStdMap) {
  torch::OrderedDict<std::string, DummyItem> ordered;
  ordered.insert("z", {4});
  ordered.insert("a", {4});
  EXPECT_THAT(
      files_of(split_state_dict_into_shards_factory(
          ordered, dummy_size, NoStorageId{}, dummy_options(5))),
      ElementsAre(
          Pair("file-00001-of-00002.dummy", ElementsAre("z")),
          Pair("file-00002-of-00002.dummy", ElementsAre("a"))));
  const std::map<std::string, DummyItem> sorted = {{"z", {4}}, {"a", {4}}};
  EXPECT_THAT(
      files_of(split_state_dict_into_shards_factory(
          sorted, dummy_size, NoStorageId{}, dummy_options(5))),
      ElementsAre(
          Pair("file-00001-of-00002.dummy", ElementsAre("a")),
          Pair("file-00002-of-00002.dummy", ElementsAre("z"))));
}

TEST(SplitFactoryTest, PatternWithoutSuffixIsAValueErrorWhenSharded) {
  // SPEC deviation 4 (the reference keeps only the last shard, §3.A-6/E-15).
  EXPECT_THROW_MESSAGE(
      split_state_dict_into_shards_factory(
          dummy_state_dict(),
          dummy_size,
          NoStorageId{},
          SplitOptions().filename_pattern("my-pattern").max_shard_size(10)),
      ValueError,
      "filename_pattern 'my-pattern' has no '{suffix}' placeholder, but the "
      "state dict needs 4 shards: every shard would get the same file name. "
      "Add '{suffix}' to the pattern or raise max_shard_size.");
  // One shard is fine: the pattern is the file name.
  const auto split = split_state_dict_into_shards_factory(
      dummy_state_dict(),
      dummy_size,
      NoStorageId{},
      SplitOptions().filename_pattern("my-pattern").max_shard_size(100));
  EXPECT_THAT(
      files_of(split), ElementsAre(Pair("my-pattern", ::testing::SizeIs(5))));
}

TEST(SplitFactoryTest, InvalidPatternIsAValueErrorEvenForOneShard) {
  EXPECT_THROW_CONTAINS(
      split_state_dict_into_shards_factory(
          dummy_state_dict(),
          dummy_size,
          NoStorageId{},
          SplitOptions().filename_pattern("model{variant}{suffix}.bin")),
      ValueError,
      "unsupported replacement field '{variant}'");
}

TEST(SplitFactoryTest, EmptyStateDictIsAValueError) {
  EXPECT_THROW_MESSAGE(
      split_state_dict_into_shards_factory(DummyStateDict{}, dummy_size),
      ValueError,
      "Cannot split an empty state dict: there is no tensor to save.");
}

TEST(SplitFactoryTest, StateDictWithoutTensorsIsAValueError) {
  const std::vector<std::pair<std::string, std::string>> sd = {
      {"a", "x"}, {"b", "y"}};
  EXPECT_THROW_MESSAGE(
      split_state_dict_into_shards_factory(
          sd,
          [](const std::string&) -> std::optional<int> {
            return std::nullopt;
          }),
      ValueError,
      "Cannot split the state dict: none of its 2 entries is a tensor.");
}

TEST(SplitFactoryTest, NegativeStorageSizeIsAValueError) {
  const DummyStateDict sd = {{"ok", {1}}, {"bad", {-3}}};
  EXPECT_THROW_MESSAGE(
      split_state_dict_into_shards_factory(sd, dummy_size),
      ValueError,
      "Storage size of 'bad' is negative (-3 bytes).");
}

TEST(SplitFactoryTest, TotalSizeOverflowIsAValueError) {
  const std::vector<std::pair<std::string, std::int64_t>> sd = {
      {"a", std::numeric_limits<std::int64_t>::max()}, {"b", 1}};
  EXPECT_THROW_CONTAINS(
      split_state_dict_into_shards_factory(
          sd, [](std::int64_t s) { return s; }),
      ValueError,
      "overflows 64 bits at 'b'");
}

TEST(SplitFactoryTest, DuplicateNamesAreAValueError) {
  const DummyStateDict sd = {{"a", {1}}, {"b", {1}}, {"a", {1}}};
  EXPECT_THROW_MESSAGE(
      split_state_dict_into_shards_factory(sd, dummy_size),
      ValueError,
      "Duplicate tensor name 'a' in the state dict: every name must be "
      "unique.");
}

TEST(SplitFactoryTest, ZeroSizeTensorsArePlaced) {
  const DummyStateDict sd = {{"a", {0}}, {"b", {10}}, {"c", {0}}};
  const auto split = split_state_dict_into_shards_factory(
      sd, dummy_size, NoStorageId{}, dummy_options(10));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(Pair("file.dummy", ElementsAre("a", "b", "c"))));
}

// ---------------------------------------------------------------------------
// split_torch_state_dict_into_shards

TEST(SplitTorchTest, DefaultsArePythonDefaults) {
  const auto split = split_torch_state_dict_into_shards(torch_state_dict());
  EXPECT_FALSE(split.is_sharded);
  EXPECT_THAT(
      files_of(split),
      ElementsAre(Pair("model.safetensors", ::testing::SizeIs(5))));
  EXPECT_EQ(split.metadata.total_size, 40);
}

TEST(SplitTorchTest, ShardsByStorageBytes) {
  // FX-torch with max 30 (E-01's plan): 8-byte tensors, three fit per shard.
  const auto split = split_torch_state_dict_into_shards(
      torch_state_dict(), SplitOptions().max_shard_size(30));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair(
              "model-00001-of-00002.safetensors",
              ElementsAre("layer_1", "layer_2", "layer_3")),
          Pair(
              "model-00002-of-00002.safetensors",
              ElementsAre("layer_4", "layer_5"))));
  EXPECT_EQ(split.metadata.total_size, 40);
}

TEST(SplitTorchTest, SharedLayersStayTogetherAndCountOnce) {
  // FX-shared with max 2.
  const StateDict sd = torchser::testing::fx_shared_state_dict();
  const auto split =
      split_torch_state_dict_into_shards(sd, SplitOptions().max_shard_size(2));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair(
              "model-00001-of-00003.safetensors",
              ElementsAre("shared_1", "shared_2")),
          Pair("model-00002-of-00003.safetensors", ElementsAre("unique_1")),
          Pair("model-00003-of-00003.safetensors", ElementsAre("unique_2"))));
  EXPECT_EQ(split.metadata.total_size, 24);
}

TEST(SplitTorchTest, ViewsCountTheirWholeStorageOnce) {
  // §3.A-5: a view counts the full storage; other views of it are aliases.
  const auto big = at::zeros({100}, at::kFloat); // 400 bytes
  StateDict sd;
  sd.insert("part", big.slice(0, 10, 20));
  sd.insert("small", at::zeros({2}, at::kFloat));
  sd.insert("transposed", big.view({10, 10}).t());
  const auto split = split_torch_state_dict_into_shards(
      sd, SplitOptions().max_shard_size(100));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair(
              "model-00001-of-00002.safetensors",
              ElementsAre("part", "transposed")),
          Pair("model-00002-of-00002.safetensors", ElementsAre("small"))));
  EXPECT_EQ(split.metadata.total_size, 408);
}

TEST(SplitTorchTest, EmptyTensorsShareOneIdAndOneFile) {
  // E-14 / §3.A-11
  StateDict sd;
  sd.insert("a", at::empty({0}));
  sd.insert("w", at::zeros({4}));
  sd.insert("b", at::empty({0}));
  const auto split =
      split_torch_state_dict_into_shards(sd, SplitOptions().max_shard_size(16));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(Pair("model.safetensors", ElementsAre("a", "w", "b"))));
  EXPECT_EQ(split.metadata.total_size, 16);
}

TEST(SplitTorchTest, MetaTensorsAreIndependent) {
  const auto meta =
      at::empty({4}, at::TensorOptions().device(at::kMeta).dtype(at::kFloat));
  StateDict sd;
  sd.insert("a", meta);
  sd.insert("b", meta);
  const auto split =
      split_torch_state_dict_into_shards(sd, SplitOptions().max_shard_size(16));
  EXPECT_THAT(
      files_of(split),
      ElementsAre(
          Pair("model-00001-of-00002.safetensors", ElementsAre("a")),
          Pair("model-00002-of-00002.safetensors", ElementsAre("b"))));
  EXPECT_EQ(split.metadata.total_size, 32);
}

TEST(SplitTorchTest, UndefinedTensorIsAValueErrorNamingTheKey) {
  StateDict sd;
  sd.insert("ok", at::zeros({1}));
  sd.insert("decoder.bias", at::Tensor());
  EXPECT_THROW_MESSAGE(
      split_torch_state_dict_into_shards(sd),
      ValueError,
      "Tensor 'decoder.bias': the tensor is undefined (a default-constructed "
      "at::Tensor has no storage).");
}

TEST(SplitTorchTest, SparseTensorIsAValueErrorNamingTheKey) {
  StateDict sd;
  sd.insert(
      "embedding",
      at::_sparse_coo_tensor_unsafe(
          at::zeros({1, 1}, at::kLong), at::ones({1}), {3}));
  EXPECT_THROW_CONTAINS(
      split_torch_state_dict_into_shards(sd),
      ValueError,
      "Tensor 'embedding': a tensor with layout Sparse has no storage");
}

TEST(SplitTorchTest, EmptyStateDictIsAValueError) {
  EXPECT_THROW_CONTAINS(
      split_torch_state_dict_into_shards(StateDict()),
      ValueError,
      "empty state dict");
}

TEST(SplitTorchTest, InputIsNotModified) {
  auto sd = torch_state_dict();
  const auto before = sd.keys();
  split_torch_state_dict_into_shards(sd, SplitOptions().max_shard_size(10));
  EXPECT_EQ(sd.keys(), before);
}

} // namespace
} // namespace torchser
