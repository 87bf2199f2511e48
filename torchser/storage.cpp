#include <torchser/storage.h>

#include <sstream>
#include <string>

#include <torchser/errors.h>

#include "torchser/detail/tensor_check.h"

namespace torchser {
namespace detail {

// Python reaches the storage through `untyped_storage()`, which sparse and
// mkldnn tensors do not have; it fails there too, only less clearly.
void check_tensor_has_storage(
    const at::Tensor& tensor, std::string_view context) {
  if (!tensor.defined()) {
    throw ValueError(
        std::string(context) +
        ": the tensor is undefined (a default-constructed at::Tensor has no "
        "storage).");
  }
  if (!tensor.is_meta() && !tensor.has_storage()) {
    std::ostringstream msg;
    msg << context << ": a tensor with layout " << tensor.layout()
        << " has no storage; only strided (dense) tensors can be sized and "
           "saved. Convert it first (for example with to_dense()).";
    throw ValueError(msg.str());
  }
}

} // namespace detail

std::optional<StorageId> get_torch_storage_id(const at::Tensor& tensor) {
  detail::check_tensor_has_storage(tensor, "get_torch_storage_id");
  if (tensor.is_meta()) {
    return std::nullopt;
  }
  // The storage's own base address, not tensor.data_ptr(): views at different
  // offsets into one storage must share an id. The const DataPtr accessor
  // exists in LibTorch 1.13 and 2.x and never materializes copy-on-write
  // storages.
  const c10::Storage& storage = tensor.storage();
  const auto address =
      reinterpret_cast<std::uintptr_t>(storage.data_ptr().get());
  return StorageId{
      tensor.device(), address, static_cast<std::int64_t>(storage.nbytes())};
}

std::int64_t get_torch_storage_size(const at::Tensor& tensor) {
  detail::check_tensor_has_storage(tensor, "get_torch_storage_size");
  if (tensor.is_meta()) {
    return tensor.numel() * static_cast<std::int64_t>(tensor.element_size());
  }
  return static_cast<std::int64_t>(tensor.storage().nbytes());
}

} // namespace torchser
