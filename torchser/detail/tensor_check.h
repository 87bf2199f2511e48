#pragma once

// Checks shared by everything that sizes or serializes tensors. Never
// installed.

#include <string_view>

#include <ATen/core/Tensor.h>

namespace torchser::detail {

/// Throws ValueError, prefixed with `context` (a function name or
/// "tensor 'name'"), when `tensor` is undefined or has no storage (sparse,
/// mkldnn and nested layouts). Meta tensors pass: they have a size but no
/// memory.
void check_tensor_has_storage(
    const at::Tensor& tensor, std::string_view context);

} // namespace torchser::detail
