#pragma once

/// \file
/// PyTorch DCP's sharded Hugging Face layout turned into the standard one.
///
/// `torch.distributed.checkpoint.HuggingFaceStorageWriter(save_distributed=
/// True)` has every rank write `shard-RRRRR-model-KKKKK-of-NNNNN.safetensors`
/// files holding its pieces, each piece's place in the full tensor recorded
/// in `__metadata__["DCP_SHARDING_INFO"]` (`saved_offsets`). Consolidation
/// writes `model-KKKKK-of-NNNNN.safetensors` files of the full tensors and
/// `model.safetensors.index.json`, as PyTorch's
/// `consolidate_safetensors_files` names them, by streaming positional copies
/// of the pieces' contiguous runs (in-kernel copy_file_range where the
/// filesystem offers it): memory stays one chunk, never a tensor, and every
/// dtype works (PyTorch's own consolidation sizes elements with
/// `torch.finfo`, which integer and bool tensors do not have).
///
/// The files are torchser's canonical safetensors (the official writer's
/// header order, `"format": "pt"`), committed as a save is: the old
/// checkpoint in the destination stays whole for every reader until the new
/// one is complete.

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/arg.h>

#include <torchser/export.h>
#include <torchser/progress.h>

namespace torchser {

/// Tensor name → output file index (1-based).
using FqnToIndexMapping = std::map<std::string, int>;

/// Options of consolidate_safetensors_files().
struct TORCHSER_API ConsolidateOptions {
  /// Tensor name → output file index (1-based), as PyTorch's
  /// `fqn_to_index_mapping`; unset: the index in the names of the shard
  /// files holding the tensor.
  TORCH_ARG(std::optional<FqnToIndexMapping>, fqn_to_index_mapping) =
      std::nullopt;
  /// fsync the files and the directory at the commit. Default: true.
  TORCH_ARG(bool, durable) = true;
  /// Called after each piece is copied (see progress.h). Default: none.
  TORCH_ARG(ProgressCallback, progress);
};

/// What consolidate_safetensors_files() wrote.
struct TORCHSER_API ConsolidateResult {
  /// The output files (tensor files, then the index).
  std::vector<std::string> files;
  /// Tensors written.
  std::size_t tensors = 0;
  /// Tensor bytes written (the index's total_size).
  std::uint64_t total_bytes = 0;
  /// Shard files read.
  std::size_t input_files = 0;
};

/// Consolidates the DCP sharded layout in `input_dir` into `output_dir`
/// (created when missing; may be `input_dir`). Throws ValueError naming the
/// file and tensor for a layout that is not DCP's (no shard files, no or bad
/// DCP_SHARDING_INFO, a tensor without offsets), pieces that disagree on
/// dtype or rank, overlap or leave holes, and a tensor mapped to two output
/// files; the format's errors for damaged shard files; OSError.
TORCHSER_API ConsolidateResult consolidate_safetensors_files(
    const std::filesystem::path& input_dir,
    const std::filesystem::path& output_dir,
    const ConsolidateOptions& options = {});

} // namespace torchser
