// Job 2: load a checkpoint written by Python into a C++ module and run it.
//
// The checkpoint is a sharded pickle checkpoint written by huggingface_hub's
// save_torch_state_dict (pytorch_model-0000N-of-00003.bin + index) for a
// module with six 8x8 layers; the C++ module declares the same names.
//
// Usage: load_checkpoint CHECKPOINT_DIR

#include <cstdio>
#include <iostream>
#include <memory>

#include <torch/nn/module.h>
#include <torch/utils.h>

#include <torchser/load.h>

struct Layers : torch::nn::Module {
  Layers() {
    auto list =
        register_module("layers", std::make_shared<torch::nn::Module>());
    for (int i = 0; i < 6; ++i) {
      auto layer = std::make_shared<torch::nn::Module>();
      weights.push_back(
          layer->register_parameter("weight", torch::zeros({8, 8})));
      if (i == 0) {
        bias = layer->register_parameter("bias", torch::zeros({8}));
      }
      list->register_module(std::to_string(i), layer);
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (const auto& w : weights) {
      x = torch::tanh(torch::matmul(x, w.t()) / 64.0 + bias);
    }
    return x;
  }
  std::vector<torch::Tensor> weights;
  torch::Tensor bias;
};

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: load_checkpoint CHECKPOINT_DIR\n";
    return 2;
  }
  Layers model;
  // safe(false): the checkpoint is pickle shards; torchser reads them without
  // Python and without executing anything from them.
  const auto result = torchser::load_torch_model(
      model, argv[1], torchser::LoadOptions().safe(false).strict(true));
  std::printf(
      "loaded: %zu missing, %zu unexpected keys\n",
      result.missing_keys.size(),
      result.unexpected_keys.size());
  torch::NoGradGuard no_grad;
  const auto y = model.forward(torch::ones({1, 8}));
  std::cout << "output: " << y << "\n";
  std::printf(
      "layers.0.weight sum = %.1f\n", model.weights[0].sum().item<double>());
  return result.missing_keys.empty() && result.unexpected_keys.empty() ? 0 : 1;
}
