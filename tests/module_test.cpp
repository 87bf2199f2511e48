// torchser::state_dict(module): Python's state_dict() keys and order.

#include <torchser/module.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <nlohmann/json.hpp>

#include <torchser/storage.h>

#include "test_utils.h"

namespace torchser {
namespace {

TEST(ModuleStateDictTest, SequentialMatchesPythonKeysAndOrder) {
  // The fixture's module: Sequential(Linear(4,3), ReLU, Linear(3,2),
  // BatchNorm1d(2)), saved from Python.
  torch::nn::Sequential model(
      torch::nn::Linear(4, 3),
      torch::nn::ReLU(),
      torch::nn::Linear(3, 2),
      torch::nn::BatchNorm1d(2));
  const auto expected =
      nlohmann::ordered_json::parse(torchser::testing::read_file(
                                        torchser::testing::fixtures_dir() /
                                        "reference/pickle/expected.json"))
          .at("sequential_state_dict.bin");
  std::vector<std::string> python_keys;
  for (const auto& [key, value] : expected.items()) {
    if (key != "_module") {
      python_keys.push_back(key);
    }
  }
  EXPECT_EQ(state_dict(*model).keys(), python_keys);
}

struct Block : torch::nn::Module {
  Block() {
    proj = register_module(
        "proj", torch::nn::Linear(torch::nn::LinearOptions(2, 2).bias(false)));
    scale = register_parameter("scale", at::ones({2}));
    register_buffer("steps", at::zeros({1}, at::kLong));
    norm = register_module("norm", torch::nn::BatchNorm1d(2));
  }
  torch::nn::Linear proj{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  at::Tensor scale;
};

struct TiedModel : torch::nn::Module {
  TiedModel() {
    embed = register_module("embed", torch::nn::Embedding(5, 2));
    block = register_module("block", std::make_shared<Block>());
    head = register_module(
        "head", torch::nn::Linear(torch::nn::LinearOptions(2, 5).bias(false)));
    // Tie the way LibTorch users do: the registered parameter keeps its
    // TensorImpl and takes the embedding's storage.
    head->weight.set_data(embed->weight);
  }
  torch::nn::Embedding embed{nullptr};
  std::shared_ptr<Block> block;
  torch::nn::Linear head{nullptr};
};

TEST(ModuleStateDictTest, OwnParametersThenBuffersThenChildren) {
  const TiedModel model; // stack-allocated: no shared_from_this needed
  EXPECT_EQ(
      state_dict(model).keys(),
      (std::vector<std::string>{
          "embed.weight",
          "block.scale",
          "block.steps",
          "block.proj.weight",
          "block.norm.weight",
          "block.norm.bias",
          "block.norm.running_mean",
          "block.norm.running_var",
          "block.norm.num_batches_tracked",
          "head.weight"}));
}

TEST(ModuleStateDictTest, EntriesAreDetachedAliasesOfTheModuleTensors) {
  const TiedModel model;
  const auto sd = state_dict(model);
  EXPECT_FALSE(sd["embed.weight"].requires_grad());
  EXPECT_EQ(sd["embed.weight"].data_ptr(), model.embed->weight.data_ptr());
  EXPECT_EQ(
      get_torch_storage_id(sd["head.weight"]),
      get_torch_storage_id(sd["embed.weight"]));
}

} // namespace
} // namespace torchser
