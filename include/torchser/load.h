#pragma once

/// \file
/// Loading checkpoints into modules as huggingface_hub does
/// (`load_torch_model`, `load_state_dict_from_file`): a single file, a
/// directory with an index (safetensors or pickle shards), or a directory
/// holding one file.
///
/// Deliberate differences from the reference:
/// - `strict` works with sharded checkpoints: every key is checked against
///   the index first (the reference's "Missing key(s): …" message), then shards
///   load one by one.
/// - Nothing is copied into the module until every key and shape has been
///   checked, so an error never leaves a half-loaded module.
/// - Tied weights recorded as `alias → kept` in the metadata by the savers
///   are filled from the kept tensor and not reported missing.
/// - `safe = false` prefers safetensors, then pickle (the reference's
///   docstring behaviour); missing / unexpected keys are sorted; shards load
///   in sorted order; index paths use CPython 3.12's stricter drive rule.

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/arg.h>

#include <torchser/export.h>
#include <torchser/load_backend.h>
#include <torchser/state_dict.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser {

/// Keyword arguments of `load_torch_model` / `load_state_dict_from_file`,
/// with the Python defaults.
struct TORCHSER_API LoadOptions {
  /// Fail unless the checkpoint's keys are exactly the module's.
  TORCH_ARG(bool, strict) = false;
  /// In a directory: safetensors only (true), or safetensors then pickle.
  TORCH_ARG(bool, safe) = true;
  /// Accepted for compatibility: torchser's pickle reader only ever loads
  /// tensors and plain containers (Python's weights_only=True allowlist).
  TORCH_ARG(bool, weights_only) = false;
  /// Device of the returned tensors of load_state_dict_from_file (unset:
  /// CPU). load_torch_model refuses it: it copies into the module's own
  /// tensors, wherever they are.
  TORCH_ARG(std::optional<c10::Device>, map_location) = std::nullopt;
  /// How files are read, for every format and both functions (the one I/O
  /// knob): kMmap (the default: tensors of load_state_dict_from_file are
  /// views of a copy-on-write mapping, and nothing is read until used; the
  /// files must not be rewritten in place meanwhile) or kPread (copies read
  /// with pread, for files another process may rewrite; see load_backend.h).
  TORCH_ARG(LoadBackend, backend) = LoadBackend::kMmap;
  /// Python's `mmap=` spelling of the same knob: true is kMmap, false kPread.
 public: // TORCH_ARG leaves the struct in private:
  LoadOptions& mmap(bool on) {
    backend_ = on ? LoadBackend::kMmap : LoadBackend::kPread;
    return *this;
  }
  /// Whether the backend is kMmap.
  bool mmap() const {
    return backend_ == LoadBackend::kMmap;
  }
  /// Explicit file-name pattern in a directory.
  TORCH_ARG(std::optional<std::string>, filename_pattern) = std::nullopt;
};

/// Python's `_IncompatibleKeys`, both lists sorted.
struct TORCHSER_API LoadResult {
  std::vector<std::string>
      missing_keys; ///< the module's keys the checkpoint lacks
  std::vector<std::string>
      unexpected_keys; ///< the checkpoint's keys the module lacks
};

/// `huggingface_hub.load_state_dict_from_file`: `.safetensors` through the
/// safetensors reader (its `format` metadata must be "pt" or "mlx" when there
/// is metadata), anything else through the torch.save reader (a state dict,
/// or the one a checkpoint nests).
///
/// Throws FileNotFoundError ("No checkpoint file found at …") when `path` is
/// not a regular file, OSError
/// ("does not contain the valid metadata") for bad safetensors metadata,
/// SafetensorError / UnpicklingError for damaged files.
TORCHSER_API StateDict load_state_dict_from_file(
    const std::filesystem::path& path, const LoadOptions& options = {});

/// `huggingface_hub.load_torch_model`: copies a checkpoint's values into
/// `model`'s existing parameters and buffers (no reallocation: tied
/// parameters stay tied, optimizers keep their references), without autograd,
/// converting dtypes as `copy_` does. Returns the missing and unexpected keys.
///
/// Throws ValueError ("Checkpoint path … does not exist", "… does not
/// contain a valid checkpoint", bad shard names in an index, a `.dduf`
/// path, map_location set), RuntimeError (strict mismatch,
/// size mismatch, in PyTorch's or huggingface_hub's format), and the errors
/// of the readers.
TORCHSER_API LoadResult load_torch_model(
    torch::nn::Module& model,
    const std::filesystem::path& checkpoint_path,
    const LoadOptions& options = {});

} // namespace torchser
