#pragma once

// Loading one tensor file (or DDUF entry) into a module, shared by
// load_torch_model and the DDUF loader. Never installed.

#include <torchser/load.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser::detail {

class TensorFile;

/// Checks the format metadata, keys, shapes and strictness, then copies
/// `file`'s tensors into `model` one at a time.
LoadResult load_tensor_file_into(
    torch::nn::Module& model,
    const TensorFile& file,
    const LoadOptions& options);

} // namespace torchser::detail
