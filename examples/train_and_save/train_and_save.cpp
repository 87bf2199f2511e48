// Job 1: train a model in C++ and save checkpoints the Python ecosystem reads.
//
// Trains a small MLP for a few steps, saves it sharded (safetensors + index,
// as huggingface_hub's save_torch_model), reloads it strictly into a fresh
// model and checks that the outputs match.
//
// Usage: train_and_save OUTPUT_DIR

#include <cstdio>
#include <filesystem>
#include <iostream>

#include <torch/nn/functional/loss.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <torchser/load.h>
#include <torchser/save.h>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: train_and_save OUTPUT_DIR\n";
    return 2;
  }
  const std::filesystem::path out = argv[1];
  std::filesystem::create_directories(out);

  torch::manual_seed(0);
  torch::nn::Sequential model(
      torch::nn::Linear(16, 64), torch::nn::ReLU(), torch::nn::Linear(64, 1));
  torch::optim::SGD optimizer(
      model->parameters(), torch::optim::SGDOptions(0.05));
  const auto x = torch::randn({128, 16});
  const auto y = x.sum(1, /*keepdim=*/true);
  for (int step = 1; step <= 50; ++step) {
    optimizer.zero_grad();
    const auto loss = torch::nn::functional::mse_loss(model->forward(x), y);
    loss.backward();
    optimizer.step();
    if (step % 25 == 0) {
      std::printf("step %d: loss %.4f\n", step, loss.item<double>());
    }
  }

  torchser::save_torch_model(
      *model, out, torchser::SaveOptions().max_shard_size("2KB"));
  std::cout << "saved to " << out.string() << ":";
  for (const auto& entry : std::filesystem::directory_iterator(out)) {
    std::cout << " " << entry.path().filename().string();
  }
  std::cout << "\n";

  torch::nn::Sequential fresh(
      torch::nn::Linear(16, 64), torch::nn::ReLU(), torch::nn::Linear(64, 1));
  torchser::load_torch_model(*fresh, out, torchser::LoadOptions().strict(true));
  const double difference =
      (fresh->forward(x) - model->forward(x)).abs().max().item<double>();
  std::printf("reloaded strictly; max |output difference| = %g\n", difference);
  return difference == 0.0 ? 0 : 1;
}
