#pragma once

/// \file
/// PyTorch's `torch.save` format, read and written without Python and without
/// LibTorch's unpickler (which cannot read `nn.Module.state_dict()` files).
///
/// Layout of a `torch.save` file (zip format, PyTorch ≥ 1.6):
/// 1. A ZIP archive of stored (uncompressed) entries under one folder
///    `<archive>/`: `data.pkl`, one `data/<key>` record per storage (64-byte
///    aligned in the file), `version` ("3\n"), and in newer releases
///    `byteorder` ("little") and `.data/serialization_id`.
/// 2. `data.pkl` is a pickle (protocol 2) of the saved object. Tensors are
///    `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
///    calls whose storage is a persistent id
///    `('storage', torch.TypeStorage, 'key', 'location', numel)`.
///
/// The reader is a small pickle machine that only knows the allowlisted
/// globals (those of Python's `weights_only=True`): it never executes
/// anything from a file. Storages are memory-mapped records (or one copy per
/// storage), so tied weights and views come back sharing one storage.
///
/// Example:
/// ```
/// torchser::PickleValue checkpoint =
/// torchser::torch_load("pytorch_model.bin"); torchser::StateDict sd =
/// torchser::extract_state_dict(checkpoint); torchser::torch_save(sd,
/// "copy.bin");   // Python's torch.load reads it
/// ```

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/arg.h>

#include <torchser/errors.h>
#include <torchser/export.h>
#include <torchser/state_dict.h>

namespace torchser {

/// A Python value as `torch.save` pickles it: None, bool, int, float, str,
/// bytes, tensor, list, tuple, dict (or `collections.OrderedDict`).
class TORCHSER_API PickleValue {
 public:
  /// The Python type.
  enum class Kind {
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kBytes,
    kTensor,
    kList,
    kTuple,
    kDict
  };
  /// The elements of a list or tuple.
  using Items = std::vector<PickleValue>;
  /// The (key, value) pairs of a dict, in insertion order.
  using DictItems = std::vector<std::pair<PickleValue, PickleValue>>;

  /// None.
  PickleValue() = default;
  /// A value of each kind.
  ///@{
  static PickleValue from_bool(bool value);
  static PickleValue from_int(std::int64_t value);
  static PickleValue from_float(double value);
  static PickleValue from_string(std::string value);
  static PickleValue from_bytes(std::string value);
  static PickleValue from_tensor(at::Tensor value);
  static PickleValue list(Items items);
  static PickleValue tuple(Items items);
  ///@}
  /// A dict; `ordered` marks a `collections.OrderedDict`. Both keep their
  /// insertion order.
  static PickleValue dict(DictItems items, bool ordered = false);

  /// The Python type.
  Kind kind() const noexcept {
    return kind_;
  }
  /// Whether the value is None.
  bool is_none() const noexcept {
    return kind_ == Kind::kNone;
  }
  /// Whether the value is a `collections.OrderedDict`.
  bool is_ordered_dict() const noexcept {
    return kind_ == Kind::kDict && ordered_;
  }
  /// The value as bool, int, float, str or bytes, tensor, list or tuple
  /// items, dict items; each throws ValueError when the kind differs.
  ///@{
  bool to_bool() const;
  std::int64_t to_int() const;
  double to_float() const;
  const std::string& to_string() const;
  const at::Tensor& to_tensor() const;
  const Items& items() const;
  const DictItems& dict_items() const;
  ///@}
  /// The value of string key `key` in a dict, or nullptr.
  const PickleValue* find(const std::string& key) const;
  /// Python's type name: "NoneType", "int", "collections.OrderedDict", ...
  std::string type_name() const;

 private:
  Kind kind_ = Kind::kNone;
  bool ordered_ = false;
  bool bool_ = false;
  std::int64_t int_ = 0;
  double float_ = 0.0;
  std::string string_;
  at::Tensor tensor_;
  std::shared_ptr<const Items> items_;
  std::shared_ptr<const DictItems> dict_;
};

/// Options of torch_load().
struct TORCHSER_API TorchLoadOptions {
  /// Build tensors on the file's memory-mapped records (zero-copy; the
  /// mapping lives while any tensor does). false: one copy per storage.
  TORCH_ARG(bool, mmap) = true;
  /// Where tensors go (Python's `map_location`). Unset: CPU, whatever device
  /// the file names (this keeps CPU-only builds able to read GPU checkpoints).
  TORCH_ARG(std::optional<c10::Device>, map_location) = std::nullopt;
};

/// `torch.load` of a zip-format file, restricted to the weights-only
/// allowlist. Throws FileNotFoundError / OSError for I/O problems and
/// UnpicklingError for damaged, hostile or legacy (pre-1.6) files, naming the
/// file and what was wrong.
TORCHSER_API PickleValue torch_load(
    const std::filesystem::path& path, const TorchLoadOptions& options = {});

/// The flat state dict in a loaded checkpoint: the value itself when it is a
/// dict of tensors, otherwise the dict of tensors it nests (under
/// "state_dict", "model_state_dict", "model" or "module" first, else the first
/// one found among its values), e.g. `{"model": sd, "epoch": 3}`. Throws
/// ValueError when there is none.
TORCHSER_API StateDict extract_state_dict(const PickleValue& checkpoint);

/// `torch.save(state_dict, path)`: a zip-format file whose pickle uses only
/// `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and the
/// storage types, so both `torch.load(path)` and
/// `torch.load(path, weights_only=True)` read it. Tensors sharing a storage
/// share it in the file. Written to a temporary file and renamed into place;
/// records stream from the tensors (one at a time on CPU).
TORCHSER_API void torch_save(
    const StateDict& state_dict,
    const std::filesystem::path& path,
    bool durable = true);

} // namespace torchser
