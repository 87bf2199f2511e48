#pragma once

// What a save writes, decided before any file is touched: the names kept
// (tied weights stored once), the shard plan, each file's header metadata
// and the index. The one owner of these decisions for the single-process
// save and the distributed one, so that the two write the same files.
// Never installed; exported only so that the tests can reach it.

#include <string>
#include <vector>

#include <torchser/export.h>
#include <torchser/safetensors.h>
#include <torchser/save.h>
#include <torchser/split.h>
#include <torchser/state_dict.h>

#include "torchser/detail/shared_tensors.h"

namespace torchser::detail {

struct TORCHSER_API SavePlan {
  /// safetensors (true) or torch.save files.
  bool safe = true;
  /// The filename pattern in use.
  std::string pattern_text;
  /// User metadata plus the alias records of the dropped names.
  Metadata metadata;
  /// The names written (`kept`) and the ones recorded as aliases.
  DroppedAliases tied;
  /// The shard plan over `tied.kept`.
  StateDictSplit split;
  /// `<pattern>.index.json` with an empty suffix.
  std::string index_name;

  /// The shard files in order, then the index when sharded.
  std::vector<std::string> files() const;
  /// Shard `shard`'s tensors, in the plan's order.
  StateDict shard_dict(std::size_t shard) const;
  /// A safetensors file's `__metadata__`: "format": "pt", plus the user
  /// metadata and alias records when unsharded (the index holds them
  /// otherwise).
  SafetensorsMetadata file_metadata() const;
  /// The index JSON (sharded plans).
  std::string index() const;
};

/// The plan of save_torch_state_dict for `state_dict` (already under the
/// written names: see without_key_mapping). Throws ValueError for bad
/// options and RuntimeError for shared tensors without a complete owner.
TORCHSER_API SavePlan
plan_save(const StateDict& state_dict, const SaveOptions& options);

/// `options` for a state dict already renamed by its key_mapping: the
/// mapping cleared, shared_tensors_to_discard mapped.
TORCHSER_API SaveOptions without_key_mapping(const SaveOptions& options);

} // namespace torchser::detail
