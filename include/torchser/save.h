#pragma once

/// \file
/// Saving state dicts and modules as huggingface_hub does
/// (`save_torch_state_dict`, `save_torch_model`): sharded safetensors (or
/// pickle `.bin`) files plus `<pattern>.index.json`, tied weights stored
/// once.
///
/// Deliberate differences from the reference (all safer):
/// - Crash-safe for every reader: one new file is renamed over its name; a
///   sharded checkpoint is built in a sibling directory and swapped in with
///   one renameat2(RENAME_EXCHANGE), keeping the folder's other files (hard
///   links), or, where a swap cannot work, committed through a journal
///   (`.torchser-commit.json`) that the next save or load completes. A save
///   holds an exclusive flock on the directory and load_torch_model a shared
///   one, so a concurrent load never sees a commit halfway. (The README's
///   "Crash-safe" table says which guarantee holds where.)
/// - Stale files of the pattern are matched by whole name
/// (`model.safetensors.bak`
///   survives), and the pattern is never read as a regex.
/// - Inputs are never mutated; a user `format` other than "pt" is a ValueError;
///   overlapping views are grouped by the running end of the group.
/// - An empty state dict is a ValueError (the reference deletes the old
///   checkpoint and writes nothing).

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <torchser/export.h>
#include <torchser/key_mapping.h>
#include <torchser/ordered_map.h>
#include <torchser/progress.h>
#include <torchser/shared_tensors.h>
#include <torchser/split.h>
#include <torchser/state_dict.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser {

/// Keyword arguments of `save_torch_state_dict`, with the Python defaults.
struct TORCHSER_API SaveOptions {
  /// Unset: "model{suffix}.safetensors", or "pytorch_model{suffix}.bin" when
  /// safe_serialization is false. Must contain "{suffix}" when sharded.
  TORCH_ARG(std::optional<std::string>, filename_pattern) = std::nullopt;
  /// Make tensors contiguous (one at a time, while writing). Default: true.
  TORCH_ARG(bool, force_contiguous) = true;
  /// Bytes per shard, or a size string. Default: "5GB".
  TORCH_ARG(ShardSize, max_shard_size) = kMaxShardSize;
  /// User metadata: in the file when unsharded, in the index when sharded.
  TORCH_ARG(Metadata, metadata);
  /// safetensors (true) or torch.save pickle files (false).
  TORCH_ARG(bool, safe_serialization) = true;
  /// Only the main process removes stale files; every process writes.
  TORCH_ARG(bool, is_main_process) = true;
  /// Names to prefer dropping when several names share one storage.
  TORCH_ARG(std::vector<std::string>, shared_tensors_to_discard) = {};
  /// fsync files and the directory at the commit points. Default: true.
  TORCH_ARG(bool, durable) = true;
  /// Called after each tensor is written (see progress.h). Default: none.
  TORCH_ARG(ProgressCallback, progress);
  /// The module's names → the written names (see key_mapping.h): the names
  /// the Hub expects from a module whose names differ (a load's
  /// `strip_prefix("module.")` is a save's `add_prefix("module.")`, its
  /// inverse()). `shared_tensors_to_discard` names are mapped too.
  TORCH_ARG(KeyMapping, key_mapping);
  /// Write floating-point tensors in this dtype (a float32 module saved as
  /// bfloat16), as `model.to(dtype)` would have them: the shard plan uses the
  /// cast sizes, tied weights stay tied, integer and bool tensors keep their
  /// dtype. safetensors files cast one tensor at a time while writing;
  /// torch.save files, which write whole storages, one shard at a time.
  TORCH_ARG(std::optional<c10::ScalarType>, dtype) = std::nullopt;
  /// Record each tensor's CRC-32C in every safetensors file's metadata
  /// (kChecksumMetadataKey): the loaders and `torchser verify` check them
  /// and name the tensor whose bytes changed. Other readers ignore the key;
  /// the files are otherwise byte-identical. torch.save files carry ZIP
  /// CRC-32s of their own and are unchanged. Default: false.
  TORCH_ARG(bool, checksums) = false;
};

/// `huggingface_hub.save_torch_state_dict`. The directory must exist.
///
/// Throws ValueError (bad options, empty state dict, unsaveable tensors),
/// RuntimeError (shared tensors without a complete owner, "None is covering the
/// entire storage"), OSError.
///
/// Example:
/// ```
/// torchser::save_torch_state_dict(sd, "out",
/// torchser::SaveOptions().max_shard_size("200MB"));
/// ```
TORCHSER_API void save_torch_state_dict(
    const StateDict& state_dict,
    const std::filesystem::path& save_directory,
    const SaveOptions& options = {});

/// `huggingface_hub.save_torch_model`: save_torch_state_dict of
/// `torchser::state_dict(module)` (Python's key order).
TORCHSER_API void save_torch_model(
    const torch::nn::Module& model,
    const std::filesystem::path& save_directory,
    const SaveOptions& options = {});

/// Completes or undoes an interrupted save in `directory` (see the file
/// comment). Called by every save and load; harmless when there is nothing
/// to do. Returns true when it changed something.
TORCHSER_API bool recover_interrupted_save(
    const std::filesystem::path& directory);

} // namespace torchser
