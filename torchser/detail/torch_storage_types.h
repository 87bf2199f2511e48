#pragma once

// The storage classes and dtype names torch.save uses, shared by the reader
// (unpickler.cpp) and the writer (torch_save.cpp). Never installed.

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>

namespace torchser::detail {

/// The typed storage classes torch.save names ("FloatStorage"), and their
/// dtypes in this build.
const std::map<std::string, at::ScalarType>& storage_types();

/// The dtypes PyTorch 2.x pickles by name, with _rebuild_tensor_v3 over an
/// untyped (byte) storage, because no typed storage class exists for them
/// (torch.storage._new_dtypes()); and the LibTorch release that added each.
struct NamedDtype {
  const char* name; // torch.<name>
  const char* since;
  std::optional<at::ScalarType> type; // empty where this build lacks it
};
const std::vector<NamedDtype>& v3_dtypes();

/// The name torch.save gives a v3 dtype, or nullptr for a typed-storage dtype.
const char* v3_dtype_name(at::ScalarType dtype);

/// The typed storage class torch.save names for `dtype` (v2 tensors);
/// ValueError when there is none in this build.
std::string storage_type_name(at::ScalarType dtype);

/// Whether `global` is the untyped storage class (either spelling).
bool is_untyped_storage(const std::string& global);

} // namespace torchser::detail
