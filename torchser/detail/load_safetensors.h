#pragma once

// Loading one safetensors file (or DDUF entry) into a module, shared by
// load_torch_model and the DDUF loader. Never installed.

#include <string>

#include <torchser/load.h>
#include <torchser/safetensors.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser::detail {

/// Checks the format metadata (M-T9), keys, shapes and strictness, then
/// copies `file`'s tensors into `model` one at a time. `display_path` names
/// the file in messages.
LoadResult load_safetensors_into(
    torch::nn::Module& model,
    const SafeOpen& file,
    const std::string& display_path,
    const LoadOptions& options);

} // namespace torchser::detail
