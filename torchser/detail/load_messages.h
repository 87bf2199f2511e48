#pragma once

// The pieces of PyTorch's load_state_dict messages every loader builds
// (one process or a group). Never installed.

#include <string>
#include <vector>

#include <c10/util/ArrayRef.h>

namespace torchser::detail {

/// "torch.Size([2, 3])", as PyTorch prints a shape.
inline std::string torch_size(c10::IntArrayRef sizes) {
  std::string out = "torch.Size([";
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    out += (i == 0 ? "" : ", ") + std::to_string(sizes[i]);
  }
  return out + "])";
}

/// "\"a\", \"b\"" with `separator` between the quoted names.
inline std::string quoted_list(
    const std::vector<std::string>& keys, const char* separator) {
  std::string out;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    out += (i == 0 ? "\"" : std::string(separator) + "\"") + keys[i] + "\"";
  }
  return out;
}

} // namespace torchser::detail
