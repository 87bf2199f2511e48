#pragma once

/// \file
/// Distributed checkpoints: a state dict spread over the ranks of a process
/// group (replicated, or split by rows, columns or blocks, evenly or not),
/// saved rank-parallel straight into the files a single-process save of the
/// assembled model writes.
///
/// The vocabulary mirrors PyTorch's: DTensor's `Replicate()` and
/// `Shard(dim)` placements, and DCP's chunk `offsets` in the full tensor.
/// Each rank describes only its own tensors; the ranks exchange the
/// descriptions over the group and check them together before a byte is
/// written.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <torchser/export.h>
#include <torchser/ordered_map.h>
#include <torchser/process_group.h>
#include <torchser/save.h>
#include <torchser/state_dict.h>

namespace torch::nn {
class Module;
} // namespace torch::nn

namespace torchser {

/// Where a rank's local tensor sits in the full tensor.
class TORCHSER_API Placement {
 public:
  /// The whole tensor, held alike by every rank that has it (DTensor's
  /// `Replicate()`). One of them writes it.
  static Placement replicate();
  /// A slice along `dim` (DTensor's `Shard(dim)`): the full tensor's size
  /// there is `full_size` and this rank's slice starts at `offset`; the
  /// other dimensions are whole. Rows are dim 0, columns dim 1; slices may
  /// be uneven or empty.
  static Placement shard(
      std::int64_t dim, std::int64_t full_size, std::int64_t offset);
  /// A block anywhere in the full tensor (DCP's `offsets`): its full shape
  /// and the offsets of this rank's block in every dimension.
  static Placement block(
      std::vector<std::int64_t> full_shape, std::vector<std::int64_t> offsets);

  /// Whether this is replicate().
  bool is_replicate() const noexcept {
    return kind_ == Kind::kReplicate;
  }
  /// The full shape and this rank's offsets for `local`. Throws ValueError
  /// (naming `name`) when the local tensor does not fit the placement.
  void locate(
      const at::Tensor& local,
      const std::string& name,
      std::vector<std::int64_t>& full_shape,
      std::vector<std::int64_t>& offsets) const;
  /// Same kind and numbers.
  bool operator==(const Placement& other) const;

 private:
  enum class Kind { kReplicate, kShard, kBlock };
  Kind kind_ = Kind::kReplicate;
  std::int64_t dim_ = 0;
  std::int64_t full_size_ = 0;
  std::int64_t offset_ = 0;
  std::vector<std::int64_t> full_shape_;
  std::vector<std::int64_t> offsets_;
};

/// This rank's part of one tensor of the full state dict.
struct TORCHSER_API DistributedTensor {
  /// The rank's own tensor (any device, any strides).
  at::Tensor local;
  /// Where it sits in the full tensor.
  Placement placement;
};

/// This rank's part of a state dict, in the module's order. A tensor some
/// ranks do not hold is simply absent there. Two names whose local tensors
/// are the same tensor (tied weights) are saved once, as a single-process
/// save saves them.
using DistributedStateDict = OrderedMap<DistributedTensor>;

/// Pairs each local tensor with its placement: `placements` by name; a
/// name it does not list takes the placement of a listed name whose tensor
/// it is (a tied weight), or else replicate(). Throws ValueError for a
/// placement naming no tensor of `local`.
TORCHSER_API DistributedStateDict
distribute(const StateDict& local, const OrderedMap<Placement>& placements);

/// torch.chunk's split of `full_size` into `world_size` parts (DTensor's
/// `Shard` split: parts of ceil(full_size / world_size), the last ones
/// smaller or empty): {offset, size} of part `rank`.
TORCHSER_API std::pair<std::int64_t, std::int64_t> chunk_range(
    std::int64_t full_size, int rank, int world_size);

/// What one rank did in a distributed save.
struct TORCHSER_API DistributedSaveResult {
  /// Tensor bytes this rank wrote (its pieces, and the replicated tensors it
  /// was chosen to write).
  std::uint64_t bytes_written = 0;
  /// Tensor bytes the checkpoint holds, summed over every rank's share.
  std::uint64_t total_bytes = 0;
  /// The files of the checkpoint (shards, then the index when sharded).
  std::vector<std::string> files;
};

/// `save_torch_state_dict` of the full state dict the ranks hold together,
/// run by every rank of `group` at once. The directory is byte for byte
/// what `save_torch_state_dict` writes for the assembled state dict: the
/// same plan, file names, headers and index.
///
/// - The ranks exchange their tensors' descriptions and check them together
///   first: pieces that overlap, leave holes, or disagree on dtype, full
///   shape or placement kind, and ties that differ between ranks, are a
///   ValueError on every rank naming the tensor and the ranks.
/// - Every byte is written once, by a rank that holds it, at its final
///   offset (positional writes into the final files, which every rank must
///   see on a shared filesystem; ranks that do not are told so). Column and
///   block pieces are written as their contiguous runs. Each replicated
///   tensor is written by one of its holders, chosen to balance the bytes
///   each rank writes. Each rank writes on up to four threads; extra memory
///   per rank is one chunk (16 MiB) per thread at most, for pieces that must
///   be copied (non-contiguous, on a GPU, or cast).
/// - One commit, by rank 0, after every rank's bytes are durable: the
///   checkpoint is replaced whole, for every reader, as a single-process
///   save replaces it. A rank that fails makes every rank throw (its own
///   error there, DistError elsewhere naming it); one that dies or hangs
///   makes the others throw DistBackendError within the group's timeout.
///   The old checkpoint stays whole either way.
///
/// Options as `save_torch_state_dict` (rank 0 is the main process):
/// `safe_serialization`, `max_shard_size`, `filename_pattern`, `metadata`,
/// `shared_tensors_to_discard`, `force_contiguous`, `key_mapping`, `dtype`,
/// `durable`, `progress` (this rank's bytes), `checksums` (each rank
/// computes the CRC-32C of the runs it writes; rank 0 combines them in file
/// order). torch.save `.bin` files (`safe_serialization(false)`) are laid
/// out by the single-process writer too (pickle, ZIP headers, central
/// directory); each record's ZIP CRC-32 is combined the same way from the
/// ranks' runs.
TORCHSER_API DistributedSaveResult save_torch_state_dict(
    const DistributedStateDict& state_dict,
    const std::filesystem::path& save_directory,
    const ProcessGroup& group,
    const SaveOptions& options = {});

/// The distributed save of `model`'s local state dict (Python's key order),
/// with `placements` as distribute() takes them.
TORCHSER_API DistributedSaveResult save_torch_model(
    const torch::nn::Module& model,
    const OrderedMap<Placement>& placements,
    const std::filesystem::path& save_directory,
    const ProcessGroup& group,
    const SaveOptions& options = {});

} // namespace torchser
