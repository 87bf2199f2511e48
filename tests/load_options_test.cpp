// Loading checkpoints as users have them: key mapping (on load and save),
// in-memory state dicts, partial loads, dtypes and progress, through the
// public API and for every format.

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include <ATen/ops/arange.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <nlohmann/json.hpp>

#include <torchser/dduf.h>
#include <torchser/errors.h>
#include <torchser/key_mapping.h>
#include <torchser/load.h>
#include <torchser/module.h>
#include <torchser/save.h>
#include <torchser/storage.h>

#include "test_utils.h"
#include "tied_net.h"

namespace torchser {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using torchser::testing::read_file;
using torchser::testing::TempDir;
using torchser::testing::TiedNet;
using torchser::testing::write_file;

// The module's state dict under other names, as DataParallel or a wrapper
// saves it.
StateDict prefixed(const StateDict& sd, const std::string& prefix) {
  StateDict out;
  for (const auto& item : sd) {
    out.insert(prefix + item.key(), item.value());
  }
  return out;
}

StateDict without(const StateDict& sd, const std::string& key) {
  StateDict out;
  for (const auto& item : sd) {
    if (item.key() != key) {
      out.insert(item.key(), item.value());
    }
  }
  return out;
}

TiedNet filled_net(float start) {
  TiedNet net;
  at::NoGradGuard no_grad;
  float value = start;
  for (auto& item : net.named_parameters()) {
    item.value().copy_(
        at::arange(item.value().numel(), at::kFloat).reshape_as(item.value()) +
        value);
    value += 100.0F;
  }
  net.norm->running_mean.fill_(3.0F);
  return net;
}

void expect_same_values(torch::nn::Module& a, torch::nn::Module& b) {
  const StateDict sa = state_dict(a);
  const StateDict sb = state_dict(b);
  ASSERT_EQ(sa.keys(), sb.keys());
  for (const auto& item : sa) {
    EXPECT_TRUE(item.value().equal(sb[item.key()])) << item.key();
  }
}

// ---------------------------------------------------------------------------
// KeyMapping itself

TEST(KeyMappingTest, StepsApplyInOrderWithPythonGroupReferences) {
  const KeyMapping mapping =
      KeyMapping()
          .strip_prefix("module.")
          .rename(R"(^h\.(\d+)\.)", R"(layers.\1.)")
          .rename(R"(layers\.(\d+)\.attn)", "$1.attention")
          .rename(R"(gamma$)", R"(\g<0>_)")
          .add_prefix("model.");
  EXPECT_EQ(map_key("module.h.3.attn.w", mapping), "model.3.attention.w");
  EXPECT_EQ(map_key("norm.gamma", mapping), "model.norm.gamma_");
  EXPECT_EQ(map_key("other", KeyMapping().strip_prefix("module.")), "other");
  // A group reference followed by a digit, as Python reads it.
  EXPECT_EQ(
      map_key("layer3", KeyMapping().rename(R"(layer(\d))", R"(block\g<1>0)")),
      "block30");
  EXPECT_EQ(
      map_key("layer3", KeyMapping().rename(R"(layer(\d))", R"(block$1)")),
      "block3");
}

TEST(KeyMappingTest, ACallbackRenamesOrDrops) {
  const KeyMapping mapping = KeyMapping().rename_with(
      [](const std::string& key) -> std::optional<std::string> {
        if (key.find("masked_bias") != std::string::npos) {
          return std::nullopt;
        }
        return key + ".x";
      });
  EXPECT_THAT(
      map_keys({"a", "h.masked_bias", "b"}, mapping, "f"),
      ElementsAre(Pair("a", "a.x"), Pair("b", "b.x")));
}

TEST(KeyMappingTest, TwoKeysMappedToOneNameAreAnErrorNamingBoth) {
  try {
    map_keys(
        {"encoder.w", "decoder.w"},
        KeyMapping().rename("^(en|de)coder\\.", ""),
        "ckpt.safetensors");
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'encoder.w'"));
    EXPECT_THAT(e.what(), HasSubstr("'decoder.w'"));
    EXPECT_THAT(e.what(), HasSubstr("ckpt.safetensors"));
    EXPECT_THAT(e.what(), HasSubstr("to 'w'"));
  }
}

TEST(KeyMappingTest, BadPatternsAndNamedGroupsAreValueErrors) {
  EXPECT_THROW(map_key("a", KeyMapping().rename("(", "x")), ValueError);
  EXPECT_THROW(map_key("a", KeyMapping().rename("a", "\\g<name>")), ValueError);
}

TEST(KeyMappingTest, PrefixMappingsInvertAndRegexOnesRefuse) {
  const KeyMapping inverse =
      KeyMapping().strip_prefix("module.").add_prefix("x.").inverse();
  EXPECT_EQ(inverse.strip_prefix(), "x.");
  EXPECT_EQ(inverse.add_prefix(), "module.");
  EXPECT_THROW(KeyMapping().rename("a", "b").inverse(), ValueError);
}

// ---------------------------------------------------------------------------
// Key mapping on load, every format

TEST(LoadKeyMappingTest, AModulePrefixIsStrippedInEveryFormat) {
  TiedNet source = filled_net(1.0F);
  const StateDict sd = prefixed(state_dict(source), "module.");
  for (const bool safe : {true, false}) {
    for (const std::int64_t max : {std::int64_t{200}, std::int64_t{1} << 30}) {
      TempDir dir;
      save_torch_state_dict(
          sd,
          dir.path(),
          SaveOptions().safe_serialization(safe).max_shard_size(max));
      TiedNet net;
      const LoadResult result = load_torch_model(
          net,
          dir.path(),
          LoadOptions().safe(safe).strict(true).key_mapping(
              KeyMapping().strip_prefix("module.")));
      EXPECT_TRUE(result.missing_keys.empty()) << safe << max;
      EXPECT_TRUE(result.unexpected_keys.empty());
      EXPECT_TRUE(result.warnings.empty());
      expect_same_values(net, source);
      EXPECT_EQ(
          get_torch_storage_id(net.head->weight),
          get_torch_storage_id(net.embed->weight)); // still tied
      EXPECT_THAT(
          result.renamed_keys,
          ::testing::Contains(
              Pair("module.blocks.0.weight", "blocks.0.weight")));
    }
  }
}

TEST(LoadKeyMappingTest, ADdufEntryLoadsThroughTheMapping) {
  TempDir dir;
  TiedNet source = filled_net(2.0F);
  std::filesystem::create_directories(dir / "folder/unet");
  save_torch_state_dict(
      prefixed(state_dict(source), "model."), dir / "folder/unet");
  write_file(
      dir / "folder/model_index.json",
      R"({"unet": ["diffusers", "UNet2DConditionModel"]})");
  write_file(dir / "folder/unet/config.json", "{}");
  export_folder_as_dduf(dir / "pipe.dduf", dir / "folder");
  const auto entries = read_dduf_file(dir / "pipe.dduf");
  TiedNet net;
  const LoadResult result = load_torch_model_from_dduf_entry(
      net,
      entries["unet/model.safetensors"],
      LoadOptions().strict(true).key_mapping(
          KeyMapping().strip_prefix("model.")));
  EXPECT_TRUE(result.missing_keys.empty());
  expect_same_values(net, source);
}

TEST(LoadKeyMappingTest, ANonStrictLoadOfNothingWarnsWithThePrefix) {
  TempDir dir;
  TiedNet source = filled_net(1.0F);
  save_torch_state_dict(prefixed(state_dict(source), "module."), dir.path());
  TiedNet net;
  const LoadResult result = load_torch_model(net, dir.path());
  ASSERT_EQ(result.warnings.size(), 1U);
  EXPECT_THAT(result.warnings[0], HasSubstr("Nothing was loaded"));
  EXPECT_THAT(
      result.warnings[0], HasSubstr("KeyMapping().strip_prefix(\"module.\")"));
  EXPECT_TRUE(result.loaded_keys.empty());
  // A load that copies something is no warning.
  const LoadResult partly =
      load_state_dict(net, StateDict{{"norm.running_mean", at::zeros({8})}});
  EXPECT_TRUE(partly.warnings.empty());
  EXPECT_THAT(partly.loaded_keys, ElementsAre("norm.running_mean"));
}

TEST(LoadKeyMappingTest, TheStrictErrorPointsAtTheCommonPrefix) {
  TiedNet source = filled_net(1.0F);
  for (const std::int64_t max : {std::int64_t{200}, std::int64_t{1} << 30}) {
    TempDir dir;
    // The module is wrapped ("model."), the checkpoint is not.
    save_torch_state_dict(
        state_dict(source), dir.path(), SaveOptions().max_shard_size(max));
    struct Wrapper : torch::nn::Module {
      Wrapper() {
        register_module("model", std::make_shared<TiedNet>());
      }
    } wrapper;
    try {
      load_torch_model(wrapper, dir.path(), LoadOptions().strict(true));
      FAIL() << "no error";
    } catch (const RuntimeError& e) {
      EXPECT_THAT(e.what(), HasSubstr("Missing key(s)"));
      EXPECT_THAT(e.what(), HasSubstr("add_prefix(\"model.\")")) << e.what();
    }
    const LoadResult fixed = load_torch_model(
        wrapper,
        dir.path(),
        LoadOptions().strict(true).key_mapping(
            KeyMapping().add_prefix("model.")));
    EXPECT_TRUE(fixed.missing_keys.empty());
  }
}

TEST(LoadKeyMappingTest, AMappingThatMergesTwoKeysNamesBothAndTheFile) {
  TempDir dir;
  save_torch_state_dict(
      StateDict{{"a.w", at::ones({2})}, {"b.w", at::ones({2})}}, dir.path());
  TiedNet net;
  try {
    load_torch_model(
        net,
        dir.path(),
        LoadOptions().key_mapping(KeyMapping().rename("^[ab]\\.", "")));
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'a.w' and 'b.w'"));
    EXPECT_THAT(e.what(), HasSubstr("model.safetensors"));
  }
}

TEST(LoadKeyMappingTest, StateDictFromFileTakesTheMappingPrefixesAndIgnores) {
  TempDir dir;
  save_torch_state_dict(
      StateDict{
          {"module.h.0.w", at::ones({2})},
          {"module.h.1.w", at::ones({3})},
          {"module.h.0.masked_bias", at::ones({1})}},
      dir.path());
  const StateDict sd = load_state_dict_from_file(
      dir / "model.safetensors",
      LoadOptions()
          .prefixes({"module.h.0."})
          .ignore_keys({"masked_bias$"})
          .key_mapping(KeyMapping().strip_prefix("module.h.0.")));
  EXPECT_EQ(sd.keys(), std::vector<std::string>{"w"});
}

// ---------------------------------------------------------------------------
// In-memory state dicts

TEST(LoadStateDictTest, ChecksLikeLoadTorchModelAndCopiesInPlace) {
  TiedNet source = filled_net(5.0F);
  TiedNet net;
  const auto embed_ptr = net.embed->weight.data_ptr();
  StateDict sd = state_dict(source);
  const LoadResult result =
      load_state_dict(net, sd, LoadOptions().strict(true));
  EXPECT_TRUE(result.missing_keys.empty());
  EXPECT_EQ(result.loaded_keys.size(), sd.size());
  expect_same_values(net, source);
  EXPECT_EQ(net.embed->weight.data_ptr(), embed_ptr); // no reallocation
  EXPECT_EQ(
      get_torch_storage_id(net.head->weight),
      get_torch_storage_id(net.embed->weight));
  EXPECT_TRUE(net.embed->weight.requires_grad()); // copied without autograd
}

TEST(LoadStateDictTest, NothingIsCopiedUnlessEverythingFits) {
  TiedNet net = filled_net(0.0F);
  TiedNet before = filled_net(0.0F);
  StateDict sd = state_dict(filled_net(9.0F));
  sd["blocks.1.bias"] = at::zeros({7});
  try {
    load_state_dict(net, sd);
    FAIL() << "no error";
  } catch (const RuntimeError& e) {
    EXPECT_THAT(e.what(), HasSubstr("size mismatch for blocks.1.bias"));
  }
  expect_same_values(net, before);
  const StateDict missing =
      without(state_dict(filled_net(9.0F)), "norm.running_var");
  try {
    load_state_dict(net, missing, LoadOptions().strict(true));
    FAIL() << "no error";
  } catch (const RuntimeError& e) {
    EXPECT_THAT(
        e.what(),
        HasSubstr("Missing key(s) in state_dict: \"norm.running_var\""));
  }
  expect_same_values(net, before);
}

TEST(LoadStateDictTest, DtypeConversionsAreListedAndModuleOptionsRefused) {
  TiedNet net;
  StateDict sd;
  sd.insert("blocks.0.bias", at::ones({8}, at::kDouble));
  sd.insert("norm.num_batches_tracked", at::ones({}, at::kLong));
  const LoadResult result = load_state_dict(net, sd);
  ASSERT_EQ(result.dtype_changes.size(), 1U);
  EXPECT_EQ(result.dtype_changes[0].key, "blocks.0.bias");
  EXPECT_EQ(result.dtype_changes[0].from, at::kDouble);
  EXPECT_EQ(result.dtype_changes[0].to, at::kFloat);
  EXPECT_TRUE(
      net.blocks->ptr<torch::nn::LinearImpl>(0)->bias.equal(at::ones({8})));
  EXPECT_THROW(
      load_state_dict(net, sd, LoadOptions().dtype(at::kHalf)), ValueError);
  TempDir dir;
  EXPECT_THROW(
      save_torch_state_dict(sd, dir.path(), SaveOptions().dtype(at::kChar)),
      ValueError);
  save_torch_state_dict(sd, dir.path());
  EXPECT_THROW(
      load_state_dict_from_file(
          dir / "model.safetensors", LoadOptions().dtype(at::kLong)),
      ValueError);
  EXPECT_THROW(
      load_state_dict(net, sd, LoadOptions().map_location(c10::Device("cpu"))),
      ValueError);
}

// ---------------------------------------------------------------------------
// Partial loads

TEST(PartialLoadTest, OneBlockIntoASubModuleReadsOnlyItsShards) {
  TiedNet source = filled_net(1.0F);
  TempDir dir;
  // One tensor per shard: the shards of other blocks are never opened.
  save_torch_model(source, dir.path(), SaveOptions().max_shard_size(1));
  const auto index = nlohmann::json::parse(
      read_file(dir / "model.safetensors.index.json"))["weight_map"];
  for (const auto& [key, shard] : index.items()) {
    if (key.rfind("blocks.1.", 0) != 0) {
      write_file(dir / shard.get<std::string>(), "damaged"); // unreadable
    }
  }
  torch::nn::Linear block(8, 8);
  const LoadResult result = load_torch_model(
      *block,
      dir.path(),
      LoadOptions()
          .strict(true)
          .prefixes({"blocks.1."})
          .key_mapping(KeyMapping().strip_prefix("blocks.1.")));
  EXPECT_TRUE(result.missing_keys.empty());
  EXPECT_TRUE(block->weight.equal(
      source.blocks->ptr<torch::nn::LinearImpl>(1)->weight));
  EXPECT_TRUE(
      block->bias.equal(source.blocks->ptr<torch::nn::LinearImpl>(1)->bias));
}

TEST(PartialLoadTest, IgnoredKeysAreNeitherMissingNorUnexpected) {
  TiedNet source = filled_net(1.0F);
  // A buffer the checkpoint does not hold.
  StateDict sd = without(state_dict(source), "norm.running_var");
  sd.insert("extra.masked_bias", at::ones({1}));
  TempDir dir;
  save_torch_state_dict(
      sd, dir.path(), SaveOptions().safe_serialization(false));
  TiedNet net;
  const LoadResult result = load_torch_model(
      net,
      dir.path(),
      LoadOptions().safe(false).strict(true).ignore_keys(
          {"running_var$", "masked_bias"}));
  EXPECT_TRUE(result.missing_keys.empty());
  EXPECT_TRUE(result.unexpected_keys.empty());
  EXPECT_THROW(
      load_torch_model(net, dir.path(), LoadOptions().ignore_keys({"("})),
      ValueError);
}

TEST(PartialLoadTest, AnIndexEntryItsShardLacksIsAnError) {
  TempDir dir;
  save_torch_state_dict(
      StateDict{{"a", at::ones({4})}, {"b", at::ones({4})}},
      dir.path(),
      SaveOptions().max_shard_size(1));
  auto index =
      nlohmann::json::parse(read_file(dir / "model.safetensors.index.json"));
  index["weight_map"]["c"] = index["weight_map"]["a"];
  write_file(dir / "model.safetensors.index.json", index.dump());
  struct Three : torch::nn::Module {
    Three() {
      for (const char* name : {"a", "b", "c"}) {
        register_parameter(name, at::zeros({4}));
      }
    }
  } three;
  try {
    load_torch_model(three, dir.path());
    FAIL() << "no error";
  } catch (const ValueError& e) {
    EXPECT_THAT(e.what(), HasSubstr("'c'"));
    EXPECT_THAT(e.what(), HasSubstr("does not hold it"));
  }
}

// ---------------------------------------------------------------------------
// dtypes

TEST(DtypeTest, StateDictFromFileCastsFloatingTensorsOnly) {
  TempDir dir;
  for (const bool safe : {true, false}) {
    save_torch_state_dict(
        StateDict{
            {"w", at::arange(6, at::kFloat)},
            {"ids", at::arange(3, at::kLong)},
            {"mask", at::ones({2}, at::kBool)}},
        dir.path(),
        SaveOptions().safe_serialization(safe));
    const StateDict sd = load_state_dict_from_file(
        dir / (safe ? "model.safetensors" : "pytorch_model.bin"),
        LoadOptions().dtype(at::kBFloat16));
    EXPECT_EQ(sd["w"].scalar_type(), at::kBFloat16);
    EXPECT_TRUE(sd["w"].equal(at::arange(6, at::kBFloat16)));
    EXPECT_EQ(sd["ids"].scalar_type(), at::kLong);
    EXPECT_EQ(sd["mask"].scalar_type(), at::kBool);
  }
}

TEST(DtypeTest, ASaveInBf16IsWhatACastStateDictSaves) {
  // Python's model.to(torch.bfloat16): floating tensors cast, the tie kept,
  // integer buffers untouched (LibTorch's Module::to casts those too).
  TiedNet source = filled_net(1.0F);
  StateDict cast;
  for (const auto& item : state_dict(source)) {
    cast.insert(
        item.key(),
        item.value().is_floating_point() ? item.value().to(at::kBFloat16)
                                         : item.value());
  }
  cast["head.weight"] = cast["embed.weight"];
  for (const bool safe : {true, false}) {
    TempDir a;
    TempDir b;
    const auto options =
        SaveOptions().safe_serialization(safe).max_shard_size(300);
    save_torch_model(
        source, a.path(), SaveOptions(options).dtype(at::kBFloat16));
    save_torch_state_dict(cast, b.path(), options);
    for (const auto& entry : std::filesystem::directory_iterator(b.path())) {
      const auto name = entry.path().filename();
      ASSERT_TRUE(std::filesystem::exists(a / name)) << name;
      if (name.extension() !=
          ".bin") { // torch.save archives name records by id
        EXPECT_EQ(read_file(a / name), read_file(entry.path())) << name;
      }
    }
    TiedNet back;
    back.to(at::kBFloat16);
    back.head->weight.set_data(back.embed->weight);
    load_torch_model(back, a.path(), LoadOptions().safe(safe).strict(true));
    for (const auto& item : state_dict(back)) {
      EXPECT_TRUE(
          item.value().equal(cast[item.key()].to(item.value().scalar_type())))
          << item.key();
    }
  }
  // The tie is kept in a torch.save file (one storage for both names).
  TempDir one;
  save_torch_model(
      source,
      one.path(),
      SaveOptions().safe_serialization(false).dtype(at::kHalf));
  const StateDict sd = load_state_dict_from_file(one / "pytorch_model.bin");
  EXPECT_EQ(sd["head.weight"].scalar_type(), at::kHalf);
  EXPECT_EQ(
      get_torch_storage_id(sd["head.weight"]),
      get_torch_storage_id(sd["embed.weight"]));
  EXPECT_EQ(sd["norm.num_batches_tracked"].scalar_type(), at::kLong);
}

// ---------------------------------------------------------------------------
// Key mapping on save

TEST(SaveKeyMappingTest, WritesTheHubsNamesAndTheAliasesUnderThem) {
  TiedNet source = filled_net(1.0F);
  TempDir dir;
  const KeyMapping load_mapping = KeyMapping().strip_prefix("model.");
  save_torch_model(
      source,
      dir.path(),
      SaveOptions()
          .key_mapping(load_mapping.inverse())
          .shared_tensors_to_discard({"embed.weight"}));
  const StateDict written =
      load_state_dict_from_file(dir / "model.safetensors");
  EXPECT_TRUE(
      written.contains("model.embed.weight") ^
      written.contains("model.head.weight"));
  EXPECT_FALSE(written.contains("model.embed.weight")); // discard was mapped
  TiedNet net;
  const LoadResult result = load_torch_model(
      net, dir.path(), LoadOptions().strict(true).key_mapping(load_mapping));
  EXPECT_TRUE(result.missing_keys.empty());
  expect_same_values(net, source);
}

// ---------------------------------------------------------------------------
// Progress

TEST(LoadProgressTest, CalledPerTensorUpToTheTotal) {
  TiedNet source = filled_net(1.0F);
  TempDir dir;
  save_torch_model(source, dir.path(), SaveOptions().max_shard_size(300));
  std::vector<Progress> seen;
  TiedNet net;
  load_torch_model(
      net, dir.path(), LoadOptions().progress([&](const Progress& p) {
        seen.push_back(p);
      }));
  ASSERT_FALSE(seen.empty());
  std::uint64_t previous = 0;
  for (const Progress& p : seen) {
    EXPECT_GT(p.bytes_done, previous);
    EXPECT_THAT(p.file, HasSubstr("model-0"));
    previous = p.bytes_done;
  }
  EXPECT_EQ(seen.back().bytes_done, seen.back().bytes_total);
  std::uint64_t expected = 0;
  for (const auto& item : state_dict(source)) {
    if (item.key() != "head.weight") { // the alias is not read again
      expected += item.value().nbytes();
    }
  }
  EXPECT_EQ(seen.back().bytes_total, expected);
  seen.clear();
  load_state_dict_from_file(
      dir / "model-00001-of-00004.safetensors",
      LoadOptions().progress([&](const Progress& p) { seen.push_back(p); }));
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().bytes_done, seen.back().bytes_total);
}

} // namespace
} // namespace torchser
