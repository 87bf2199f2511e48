// Job 3: export a pipeline of several models as one DDUF archive, then load
// a model straight from it.
//
// Each model's weights are serialized into the archive as they are written
// (no temporary files); entries are 64-byte aligned, so loading maps them
// without a copy.
//
// Usage: export_pipeline_dduf OUTPUT.dduf

#include <cstdio>
#include <iostream>

#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/utils.h>

#include <torchser/dduf.h>
#include <torchser/load.h>
#include <torchser/module.h>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: export_pipeline_dduf OUTPUT.dduf\n";
    return 2;
  }
  torch::manual_seed(0);
  torch::nn::Conv2d unet(torch::nn::Conv2dOptions(4, 4, 3).padding(1));
  torch::nn::Embedding text_encoder(100, 16);

  torchser::export_entries_as_dduf(
      argv[1],
      {torchser::DDUFExportEntry::from_bytes(
           "model_index.json",
           R"({"_class_name": "TinyPipeline", "unet": ["diffusers", "UNet2DModel"], "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]})"),
       torchser::DDUFExportEntry::from_bytes(
           "unet/config.json", R"({"in_channels": 4})"),
       torchser::DDUFExportEntry::from_state_dict(
           "unet/diffusion_pytorch_model.safetensors",
           torchser::state_dict(*unet)),
       torchser::DDUFExportEntry::from_bytes(
           "text_encoder/config.json", R"({"vocab_size": 100})"),
       torchser::DDUFExportEntry::from_state_dict(
           "text_encoder/model.safetensors",
           torchser::state_dict(*text_encoder)),
       torchser::DDUFExportEntry::from_bytes(
           "scheduler/scheduler_config.json",
           R"({"num_train_timesteps": 1000})")});

  const auto entries = torchser::read_dduf_file(argv[1]);
  for (const auto& item : entries) {
    std::cout << item.value().repr() << "\n";
  }
  torch::nn::Conv2d loaded(torch::nn::Conv2dOptions(4, 4, 3).padding(1));
  torchser::load_torch_model_from_dduf_entry(
      *loaded,
      entries["unet/diffusion_pytorch_model.safetensors"],
      torchser::LoadOptions().strict(true));
  const auto x = torch::randn({1, 4, 8, 8});
  const double difference =
      (loaded->forward(x) - unet->forward(x)).abs().max().item<double>();
  std::printf(
      "unet loaded from the archive; max |output difference| = %g\n",
      difference);
  return difference == 0.0 ? 0 : 1;
}
