#pragma once

/// \file
/// The state dict type: LibTorch's insertion-ordered dictionary.
///
/// `Module::named_parameters()` returns exactly this type, and insertion order
/// matters everywhere Python relies on dict order (shard assignment, the
/// index's `weight_map`). `OrderedDict::insert` rejects duplicate keys.

#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h> // torch/ordered_dict.h uses TORCH_CHECK
#include <torch/ordered_dict.h>

#include <torchser/ordered_map.h>

namespace torchser {

/// Name → tensor, in insertion order (Python's `dict[str, torch.Tensor]`).
using StateDict = torch::OrderedDict<std::string, at::Tensor>;

/// Metadata of a checkpoint (the index's, or a file's): string → string in
/// insertion order, as Python writes the dict.
using Metadata = OrderedMap<std::string>;

} // namespace torchser
