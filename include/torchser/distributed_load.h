#pragma once

/// \file
/// Resharding on load: every rank of a process group fills its own pieces
/// (the placements of distributed.h) from one Hub checkpoint, whatever world
/// size or program wrote it, reading only the bytes of its pieces.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torchser/distributed.h>

#include <torchser/export.h>
#include <torchser/load.h>
#include <torchser/ordered_map.h>
#include <torchser/process_group.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser {

/// How the ranks share the reading (beyond LoadOptions).
struct TORCHSER_API DistributedLoadOptions {
  /// Tensors several ranks need whole (replicated weights, or a whole
  /// model on every rank) are read by one of them, chosen to balance the
  /// bytes each rank reads, and broadcast over the group in 16 MiB chunks,
  /// so that the group reads each byte of the checkpoint once. Unset: on
  /// when the ranks span several hosts (each host's disk or network link
  /// then carries its share only); off on one host, where the page cache
  /// already serves every rank from one copy and a broadcast only adds a
  /// copy over loopback (see the benchmark in the README).
  TORCH_ARG(std::optional<bool>, read_once) = std::nullopt;
};

/// What one rank's distributed load did.
struct TORCHSER_API DistributedLoadResult {
  /// Tensor bytes this rank read from the files (headers, indexes and
  /// pickles aside): its pieces' bytes, in the checkpoint's dtypes, and the
  /// tensors it read for others (read_once).
  std::uint64_t bytes_read = 0;
  /// Tensor bytes it received over the group instead (read_once).
  std::uint64_t bytes_received = 0;
  /// Tensor bytes of the checkpoint's tensors that some rank loaded.
  std::uint64_t total_bytes = 0;
  /// This rank's names the checkpoint lacks, sorted.
  std::vector<std::string> missing_keys;
  /// The checkpoint's names (after the key mapping) that no rank holds,
  /// sorted; the same on every rank.
  std::vector<std::string> unexpected_keys;
  /// This rank's names that received their values, sorted.
  std::vector<std::string> loaded_keys;
};

/// Fills each rank's local tensors from `checkpoint` (a `.safetensors` or
/// `.bin` file, a sharded checkpoint's folder or index, or a folder holding
/// one file; written by huggingface_hub, transformers, torchser on one
/// process or distributed; or a folder of PyTorch DCP's per-rank layout,
/// `shard-RRRRR-model-KKKKK-of-NNNNN.safetensors` files as
/// `HuggingFaceStorageWriter(save_distributed=True)` leaves them, read
/// where its pieces lie, with no consolidation), run by every rank of
/// `group` at once. A
/// sharded local tensor receives its slice of the checkpoint's tensor of
/// the placement's full shape; a replicated one the whole tensor. Values
/// are copied into the local tensors in place (any device, any strides,
/// converted to their dtype), without autograd.
///
/// - Each rank reads only the byte ranges of its pieces (contiguous runs of
///   the row-major tensors; in DCP's layout, of the parts of the stored
///   pieces its own overlap) with positional reads, straight into the local
///   tensor when its layout and dtype are the file's, else through a 16 MiB
///   chunk. Shards holding none of a rank's tensors are not opened.
/// - Before anything is copied, the ranks check everything together:
///   shapes (PyTorch's "size mismatch for …" message, naming the rank) and,
///   with `strict`, the keys: a rank's missing names, and checkpoint names
///   no rank holds. A rank that fails makes every rank throw (its own error
///   there, DistError elsewhere naming it).
/// - Tied weights recorded as `alias → kept` metadata (the savers drop the
///   alias) are filled from the kept tensor.
///
/// Options as `load_torch_model`: `strict`, `safe`, `filename_pattern`,
/// `key_mapping`, `prefixes`, `ignore_keys`, `progress` (this rank's
/// bytes). `map_location` and `dtype` are refused (ValueError): the local
/// tensors decide. `backend(kDirect)` reads the pieces with the cold-cache
/// reader (O_DIRECT, several reads in flight, only touching runs merged, so
/// a rank still reads only its share; see load_backend.h); any other backend
/// reads with pread(). `verify_checksums` does not apply (a rank reads
/// slices, not whole tensors).
TORCHSER_API DistributedLoadResult load_torch_state_dict(
    DistributedStateDict& state_dict,
    const std::filesystem::path& checkpoint,
    const ProcessGroup& group,
    const LoadOptions& options = {},
    const DistributedLoadOptions& distributed = {});

/// The distributed load into `model`'s own tensors (its state dict on this
/// rank), placed as distribute() places them.
TORCHSER_API DistributedLoadResult load_torch_model(
    torch::nn::Module& model,
    const OrderedMap<Placement>& placements,
    const std::filesystem::path& checkpoint,
    const ProcessGroup& group,
    const LoadOptions& options = {},
    const DistributedLoadOptions& distributed = {});

} // namespace torchser
