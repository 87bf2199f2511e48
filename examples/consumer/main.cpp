// Uses the installed package: plans the shards of a small state dict.

#include <iostream>

#include <ATen/ops/zeros.h>
#include <torchser/split.h>
#include <torchser/version.h>

int main() {
  torchser::StateDict sd;
  sd.insert("embed.weight", at::zeros({1000, 64}));
  sd.insert("head.weight", sd["embed.weight"]); // tied
  sd.insert("norm.weight", at::zeros({64}));
  const auto split = torchser::split_torch_state_dict_into_shards(
      sd, torchser::SplitOptions().max_shard_size("100KB"));
  std::cout << "torchser " << TORCHSER_VERSION << ": ";
  for (const auto& shard : split.filename_to_tensors) {
    std::cout << shard.key() << " (" << shard.value().size() << " tensors) ";
  }
  std::cout << "total_size=" << split.metadata.total_size << "\n";
  return split.is_sharded && split.metadata.total_size == 256256 ? 0 : 1;
}
