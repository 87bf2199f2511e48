#pragma once

// A small decoder-style language model built in C++, with the features that
// make checkpoints interesting: tied input/output embeddings (two names, one
// storage), biases, LayerNorm and BatchNorm buffers, nested module lists.

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

namespace demo {

struct TinyLMConfig {
  std::int64_t vocab_size = 512;
  std::int64_t hidden_size = 64;
  std::int64_t intermediate_size = 256;
  std::int64_t num_layers = 2;
};

struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const TinyLMConfig& c)
      : attn_norm(register_module(
            "attn_norm",
            torch::nn::LayerNorm(
                torch::nn::LayerNormOptions({c.hidden_size})))),
        qkv(register_module(
            "qkv", torch::nn::Linear(c.hidden_size, 3 * c.hidden_size))),
        out(register_module(
            "out", torch::nn::Linear(c.hidden_size, c.hidden_size))),
        mlp_norm(
            register_module("mlp_norm", torch::nn::BatchNorm1d(c.hidden_size))),
        up(register_module(
            "up", torch::nn::Linear(c.hidden_size, c.intermediate_size))),
        down(register_module(
            "down", torch::nn::Linear(c.intermediate_size, c.hidden_size))) {}

  // Causal self-attention (one head), then an MLP, both residual.
  at::Tensor forward(const at::Tensor& x) {
    const auto t = x.size(1);
    const auto qkv_out = qkv(attn_norm(x)).chunk(3, -1);
    auto scores = at::matmul(qkv_out[0], qkv_out[1].transpose(1, 2)) /
                  std::sqrt(static_cast<double>(x.size(2)));
    const auto mask = at::ones({t, t}, x.options().dtype(at::kBool)).triu(1);
    scores = scores.masked_fill(mask, -1e9);
    auto h = x + out(at::matmul(scores.softmax(-1), qkv_out[2]));
    const auto flat = mlp_norm(h.reshape({-1, h.size(2)})).reshape(h.sizes());
    return h + down(at::gelu(up(flat)));
  }

  torch::nn::LayerNorm attn_norm;
  torch::nn::Linear qkv;
  torch::nn::Linear out;
  torch::nn::BatchNorm1d mlp_norm;
  torch::nn::Linear up;
  torch::nn::Linear down;
};
TORCH_MODULE(Block);

struct TinyLMImpl : torch::nn::Module {
  explicit TinyLMImpl(const TinyLMConfig& c = {})
      : embed(register_module(
            "embed", torch::nn::Embedding(c.vocab_size, c.hidden_size))),
        layers(register_module("layers", torch::nn::ModuleList())),
        norm(register_module(
            "norm",
            torch::nn::LayerNorm(
                torch::nn::LayerNormOptions({c.hidden_size})))),
        lm_head(register_module(
            "lm_head",
            torch::nn::Linear(
                torch::nn::LinearOptions(c.hidden_size, c.vocab_size)
                    .bias(false)))) {
    for (std::int64_t i = 0; i < c.num_layers; ++i) {
      layers->push_back(Block(c));
    }
    // Tied weights: the output projection reads the embedding's storage.
    lm_head->weight.set_data(embed->weight);
  }

  // tokens [batch, time] → logits [batch, time, vocab]
  at::Tensor forward(const at::Tensor& tokens) {
    auto x = embed(tokens);
    for (const auto& layer : *layers) {
      x = layer->as<BlockImpl>()->forward(x);
    }
    return lm_head(norm(x));
  }

  torch::nn::Embedding embed;
  torch::nn::ModuleList layers;
  torch::nn::LayerNorm norm;
  torch::nn::Linear lm_head;
};
TORCH_MODULE(TinyLM);

} // namespace demo
