#pragma once

// torch.save's zip format written into a file the caller commits (a sharded
// save commits several files at once). Never installed.

#include <string>

#include <torchser/state_dict.h>

#include "torchser/detail/file.h"

namespace torchser::detail {

/// Writes `state_dict` as torch.save would, with records under `archive/`.
void write_torch_save(const StateDict& state_dict, AtomicFile& file, const std::string& archive);

} // namespace torchser::detail
