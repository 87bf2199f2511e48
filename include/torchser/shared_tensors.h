#pragma once

/// \file
/// Tensors that share storage (tied weights): safetensors'
/// `_remove_duplicate_names`, which save_torch_state_dict, DDUF export and
/// `torchser convert` apply before writing safetensors files.

#include <string>
#include <vector>

#include <torchser/export.h>
#include <torchser/ordered_map.h>
#include <torchser/state_dict.h>

namespace torchser {

/// For each kept name, the names dropped because they alias its storage, in
/// group order, names sorted; the kept name chosen as the reference chooses
/// (a name covering the whole storage, not in `discard_names` when there is
/// a choice). A storage no name covers whole is a RuntimeError, as in Python.
TORCHSER_API OrderedMap<std::vector<std::string>> remove_duplicate_names(
    const StateDict& state_dict,
    const std::vector<std::string>& discard_names = {});

} // namespace torchser
