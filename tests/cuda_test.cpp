// CUDA paths: loading onto the GPU (safetensors device, torch.load
// map_location, load_state_dict_from_file), loading into a module that lives
// on the GPU, and saving GPU tensors. They run where LibTorch has CUDA and a
// GPU is present (tests/device/check.sh on the lent GPU machine) and skip
// elsewhere; the CPU-only build's clear error is pinned in
// SafetensorsReaderTest.CudaWithoutCudaBuildIsAClearError.

#include <ATen/Context.h>
#include <ATen/ops/allclose.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/rand.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <torchser/load.h>
#include <torchser/pickle.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>

#include "test_utils.h"

namespace {

using namespace torchser;
using torchser::testing::TempDir;

const c10::Device kCuda("cuda:0");

#define SKIP_WITHOUT_CUDA()                                            \
  if (!at::hasCUDA()) {                                                \
    GTEST_SKIP()                                                       \
        << "no CUDA here: run tests/device/check.sh on a GPU machine"; \
  }

StateDict sample() {
  StateDict sd;
  sd.insert("a", at::rand({64, 32}));
  sd.insert("b", at::arange(1000, at::kLong));
  sd.insert("c", at::rand({3}).to(at::kHalf));
  return sd;
}

void expect_same_on_cuda(const StateDict& got, const StateDict& want) {
  ASSERT_EQ(got.size(), want.size());
  for (const auto& item : want) {
    const at::Tensor& t = got[item.key()];
    EXPECT_TRUE(t.device().is_cuda()) << item.key();
    EXPECT_TRUE(at::equal(t.cpu(), item.value())) << item.key();
  }
}

TEST(CudaTest, SafetensorsLoadOntoTheGpuWithBothBackends) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  const StateDict sd = sample();
  save_file(sd, dir.path() / "m.safetensors");
  for (const auto backend :
       {LoadBackend::kMmap, LoadBackend::kPread, LoadBackend::kDirect}) {
    expect_same_on_cuda(
        load_file(
            dir.path() / "m.safetensors",
            SafeOpenOptions().device(kCuda).backend(backend)),
        sd);
  }
  SafeOpen f(dir.path() / "m.safetensors", SafeOpenOptions().device(kCuda));
  const at::Tensor rows = f.get_slice("a")({SliceIndex(2, 10)});
  EXPECT_TRUE(rows.device().is_cuda());
  EXPECT_TRUE(at::equal(rows.cpu(), sd["a"].slice(0, 2, 10)));
}

TEST(CudaTest, TorchLoadHonoursMapLocationCuda) {
  SKIP_WITHOUT_CUDA();
  TempDir dir;
  const StateDict sd = sample();
  torch_save(sd, dir.path() / "m.bin");
  for (const bool mmap : {true, false}) {
    const auto value = torch_load(
        dir.path() / "m.bin",
        TorchLoadOptions().mmap(mmap).map_location(kCuda));
    expect_same_on_cuda(extract_state_dict(value), sd);
  }
  expect_same_on_cuda(
      load_state_dict_from_file(
          dir.path() / "m.bin", LoadOptions().map_location(kCuda)),
      sd);
  expect_same_on_cuda(
      load_state_dict_from_file(
          dir.path() / "m.bin", LoadOptions().map_location(kCuda).mmap(true)),
      sd);
}

struct Net : torch::nn::Module {
  explicit Net(bool on_gpu) {
    embed = register_module("embed", torch::nn::Embedding(50, 16));
    head = register_module(
        "head",
        torch::nn::Linear(torch::nn::LinearOptions(16, 50).bias(false)));
    norm = register_parameter("norm", at::rand({16}));
    if (on_gpu) {
      to(kCuda);
    }
    head->weight.set_data(
        embed->weight); // tied after the move, as a language model head
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear head{nullptr};
  at::Tensor norm;
};

TEST(CudaTest, AGpuModuleSavesAndLoadsShardedInBothFormats) {
  SKIP_WITHOUT_CUDA();
  for (const bool safe : {true, false}) {
    TempDir dir;
    Net source(true);
    save_torch_model(
        source,
        dir.path(),
        SaveOptions().max_shard_size(int64_t{2048}).safe_serialization(safe));
    for (const bool on_gpu : {true, false}) {
      Net target(on_gpu);
      const auto result = load_torch_model(
          target, dir.path(), LoadOptions().strict(true).safe(safe));
      EXPECT_TRUE(
          result.missing_keys.empty() && result.unexpected_keys.empty());
      EXPECT_EQ(
          target.embed->weight.device().is_cuda(),
          on_gpu); // loaded in place, not moved
      EXPECT_TRUE(
          at::equal(target.embed->weight.cpu(), source.embed->weight.cpu()))
          << safe << on_gpu;
      EXPECT_TRUE(at::equal(target.norm.cpu(), source.norm.cpu()));
      EXPECT_EQ(
          target.head->weight.data_ptr(),
          target.embed->weight.data_ptr()); // still tied
    }
  }
}

} // namespace
