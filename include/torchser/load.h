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
/// - A non-strict load that copies nothing warns (LibTorch's TORCH_WARN and
///   LoadResult::warnings), and both that warning and the strict error point
///   at a prefix that would make the names match.
/// - Key mapping, partial loads and progress apply to every format.
/// - `safe = false` prefers safetensors, then pickle (the reference's
///   docstring behaviour); missing / unexpected keys are sorted; shards load
///   in sorted order; index paths use CPython 3.12's stricter drive rule.

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <torchser/export.h>
#include <torchser/key_mapping.h>
#include <torchser/load_backend.h>
#include <torchser/progress.h>
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
  /// knob): kMmap (the default, for files the page cache holds: tensors of
  /// load_state_dict_from_file are views of a copy-on-write mapping, and
  /// nothing is read until used; the files must not be rewritten in place
  /// meanwhile), kDirect (for cold files: large O_DIRECT reads, many in
  /// flight, straight into new tensors, or through a staging ring into the
  /// module's own tensors, CUDA ones through pinned buffers) or kPread
  /// (copies read with pread, for files another process may rewrite). See
  /// load_backend.h for when each is fastest.
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
  /// Checkpoint names → module names (see key_mapping.h), applied before
  /// `strict`, the missing / unexpected keys and the shape checks.
  TORCH_ARG(KeyMapping, key_mapping);
  /// Only the checkpoint's tensors whose names start with one of these
  /// (before the key mapping): one component of a pipeline, or one block
  /// into a sub-module with `key_mapping(KeyMapping().strip_prefix(…))`.
  /// Only their bytes are read, and shards holding none are not opened.
  /// The others are neither loaded nor unexpected. Empty: every tensor.
  TORCH_ARG(std::vector<std::string>, prefixes) = {};
  /// Regular expressions (ECMAScript, searched as Python's `re.search`
  /// does) of module names never reported: a module key matching one is not
  /// missing (a buffer that checkpoints do not hold, like PyTorch's
  /// non-persistent ones), a checkpoint key matching one (after the key
  /// mapping) is not unexpected and not read.
  TORCH_ARG(std::vector<std::string>, ignore_keys) = {};
  /// load_state_dict_from_file: cast floating-point tensors to this dtype
  /// while reading (integer and bool tensors keep theirs). Module loads
  /// refuse it: the module's tensors decide, and LoadResult::dtype_changes
  /// lists the conversions.
  TORCH_ARG(std::optional<c10::ScalarType>, dtype) = std::nullopt;
  /// Check the per-tensor CRC-32Cs a file records (SaveOptions::checksums)
  /// before anything is copied or returned: OSError naming the file and the
  /// tensor whose bytes changed. It reads every selected byte once more.
  /// Files without checksums are not affected. Default: true.
  TORCH_ARG(bool, verify_checksums) = true;
  /// Called after each tensor is copied (see progress.h); bytes_total is the
  /// size of every tensor the load copies. Default: none.
  TORCH_ARG(ProgressCallback, progress);
};

/// A tensor whose dtype changed as it was copied into the module.
struct TORCHSER_API DtypeChange {
  std::string key;                                   ///< the module's name
  c10::ScalarType from = c10::ScalarType::Undefined; ///< the checkpoint's
  c10::ScalarType to = c10::ScalarType::Undefined;   ///< the module's
};

/// Python's `_IncompatibleKeys`, both lists sorted.
struct TORCHSER_API LoadResult {
  std::vector<std::string>
      missing_keys; ///< the module's keys the checkpoint lacks
  std::vector<std::string>
      unexpected_keys; ///< the checkpoint's keys the module lacks
  /// The module's keys that received a value (re-tied aliases included).
  std::vector<std::string> loaded_keys;
  /// (checkpoint name, module name) of every tensor the key mapping renamed
  /// and that was loaded, sorted by checkpoint name.
  std::vector<std::pair<std::string, std::string>> renamed_keys;
  /// Tensors converted on copy, sorted by key.
  std::vector<DtypeChange> dtype_changes;
  /// What a caller should know but that is no error: a non-strict load that
  /// copied nothing, with the prefix that would have matched.
  std::vector<std::string> warnings;
};

/// `huggingface_hub.load_state_dict_from_file`: `.safetensors` through the
/// safetensors reader (its `format` metadata must be "pt" or "mlx" when there
/// is metadata), anything else through the torch.save reader (a state dict,
/// or the one a checkpoint nests). The key mapping, prefixes, ignore list,
/// dtype and progress apply; names dropped by them are not read.
///
/// `path` may name a file in the Hugging Face cache
/// (`ORG/NAME[@REVISION]/FILE`, see hub_cache.h).
///
/// Throws FileNotFoundError ("No checkpoint file found at …") when `path` is
/// not a regular file (LocalEntryNotFoundError when the cache lacks it),
/// OSError
/// ("does not contain the valid metadata") for bad safetensors metadata,
/// SafetensorError / UnpicklingError for damaged files.
TORCHSER_API StateDict load_state_dict_from_file(
    const std::filesystem::path& path, const LoadOptions& options = {});

/// PyTorch's `module.load_state_dict(state_dict, strict)` with the checks of
/// load_torch_model: every key and shape is checked before anything is
/// copied, values are copied into the module's existing tensors without
/// autograd, and the key mapping, prefixes and ignore list apply.
/// `map_location` and `dtype` are refused (ValueError), as for
/// load_torch_model. Throws RuntimeError in PyTorch's format for strict and
/// shape mismatches.
TORCHSER_API LoadResult load_state_dict(
    torch::nn::Module& model,
    const StateDict& state_dict,
    const LoadOptions& options = {});

/// `huggingface_hub.load_torch_model`: copies a checkpoint's values into
/// `model`'s existing parameters and buffers (no reallocation: tied
/// parameters stay tied, optimizers keep their references), without autograd,
/// converting dtypes as `copy_` does. Returns the missing and unexpected keys.
/// `checkpoint_path` may name a repo in the Hugging Face cache
/// (`ORG/NAME[@REVISION][/FILE]`, see hub_cache.h; LocalEntryNotFoundError
/// when it is not cached).
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
