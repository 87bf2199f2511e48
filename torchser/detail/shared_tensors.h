#pragma once

// Tensors that share storage (tied weights), in one place for every writer:
// save_torch_state_dict, DDUF export and `torchser convert` store each
// storage once and record the other names as aliases, and put the aliases
// back where a format keeps shared storage itself (torch.save files).
// Never installed; exported only so that the tests can reach it.

#include <string>
#include <utility>
#include <vector>

#include <torchser/export.h>
#include <torchser/state_dict.h>

namespace torchser::detail {

struct TORCHSER_API DroppedAliases {
  /// The state dict without the dropped names, in the caller's order.
  StateDict kept;
  /// alias → the kept name whose storage it shares, in group order (the
  /// safetensors metadata records of save_torch_state_dict).
  std::vector<std::pair<std::string, std::string>> aliases;
};

/// safetensors' `_remove_duplicate_names` applied: one name per storage
/// (chosen as the reference chooses, `discard` honoured), the caller's dict
/// untouched.
TORCHSER_API DroppedAliases drop_aliases(
    const StateDict& state_dict, const std::vector<std::string>& discard = {});

/// The inverse for formats that keep shared storage (torch.save): each
/// metadata record `alias → kept` whose alias is missing and whose kept name
/// is present becomes the alias name on the kept tensor. Other records are
/// not aliases and are left alone. Returns how many it re-tied.
TORCHSER_API std::size_t retie_aliases(
    StateDict& state_dict,
    const std::vector<std::pair<std::string, std::string>>& metadata);

} // namespace torchser::detail
