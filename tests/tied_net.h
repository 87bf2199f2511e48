#pragma once

// The module of the Python round trips (tests/interop/*.py and
// tests/judges/judge.py define the same one): an embedding tied to the
// output layer, two linear blocks, a batch norm with its buffers.

#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

namespace torchser::testing {

struct TiedNet : torch::nn::Module {
  TiedNet() {
    embed = register_module("embed", torch::nn::Embedding(16, 8));
    blocks = register_module(
        "blocks",
        torch::nn::ModuleList(
            torch::nn::Linear(8, 8), torch::nn::Linear(8, 8)));
    norm = register_module("norm", torch::nn::BatchNorm1d(8));
    head = register_module(
        "head", torch::nn::Linear(torch::nn::LinearOptions(8, 16).bias(false)));
    head->weight.set_data(embed->weight); // tied: one storage
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
  torch::nn::Linear head{nullptr};
};

} // namespace torchser::testing
