#pragma once

/// \file
/// Storage identity and size: which tensors share memory, and how many bytes
/// that memory holds (`huggingface_hub.get_torch_storage_id` /
/// `get_torch_storage_size`).
///
/// Several state-dict entries can be views of one storage (tied weights,
/// slices, transposes). The shard planner keeps them in one file and counts
/// their bytes once; the savers use the same identity to find aliases.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <torchser/export.h>

namespace torchser {

/// Identity of a tensor's storage: Python's `(device, unique_id, nbytes)`.
///
/// Two tensors on the same device share a storage exactly when their ids
/// compare equal. `data_ptr` is the address of the storage's first byte (not
/// of the tensor's first element), so views at any offset of one storage get
/// the same id. Every empty storage has data_ptr 0, so all empty tensors of a
/// device share one id, as in Python.
struct TORCHSER_API StorageId {
  /// Device, including its index (`cuda:0` and `cuda:1` differ).
  c10::Device device;
  /// Address of the storage's memory (0 for an empty storage).
  std::uintptr_t data_ptr;
  /// The storage's size in bytes (see get_torch_storage_size()).
  std::int64_t nbytes;

  /// Ids are equal when device, address and size all are.
  ///@{
  friend bool operator==(const StorageId& a, const StorageId& b) noexcept {
    return a.device == b.device && a.data_ptr == b.data_ptr &&
           a.nbytes == b.nbytes;
  }
  friend bool operator!=(const StorageId& a, const StorageId& b) noexcept {
    return !(a == b);
  }
  ///@}
};

/// `huggingface_hub.get_torch_storage_id`: the identity of `tensor`'s storage,
/// or `std::nullopt` for a meta tensor (meta tensors own no memory, so the
/// planner treats each one as independent).
///
/// Throws ValueError for an undefined tensor, and for tensors that have no
/// storage (sparse, mkldnn, nested layouts).
///
/// Example:
/// ```
/// auto w = at::zeros({4, 4});
/// assert(get_torch_storage_id(w) == get_torch_storage_id(w.t()));
/// ```
TORCHSER_API std::optional<StorageId> get_torch_storage_id(
    const at::Tensor& tensor);

/// `huggingface_hub.get_torch_storage_size`: the number of bytes of the whole
/// storage behind `tensor`, not of the view (a 2-element slice of a
/// 10-element float32 tensor reports 40). For a meta tensor, which has no
/// memory, `numel() * element_size()`.
///
/// Throws ValueError for an undefined tensor, and for tensors that have no
/// storage (sparse, mkldnn, nested layouts).
TORCHSER_API std::int64_t get_torch_storage_size(const at::Tensor& tensor);

} // namespace torchser

namespace std {
/// Hashing of storage ids, for unordered containers.
template <>
struct hash<torchser::StorageId> {
  /// The id's hash.
  size_t operator()(const torchser::StorageId& id) const noexcept {
    // Distinct live storages of one device have distinct addresses, at least
    // 16 bytes apart, so the address alone identifies them; keeping its
    // order (rather than scrambling it) lets a table of storages allocated
    // one after another be filled and probed nearly sequentially. The device
    // goes into the top bits; nbytes only separates the empty storages
    // (address 0) and is equal for every alias of one storage anyway.
    const auto device =
        (static_cast<size_t>(static_cast<std::uint8_t>(id.device.type()))
         << 8) |
        static_cast<size_t>(static_cast<std::uint8_t>(id.device.index()));
    return (static_cast<size_t>(id.data_ptr) >> 4) ^ (device << 48) ^
           static_cast<size_t>(id.nbytes);
  }
};
} // namespace std
