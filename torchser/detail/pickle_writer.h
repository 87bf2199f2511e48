#pragma once

// torch.save's zip format written into a file the caller commits (a sharded
// save commits several files at once). Never installed.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torchser/state_dict.h>

#include "torchser/detail/file.h"

namespace torchser::detail {

/// Names of the tensors a record holds and its bytes, after it was written.
using RecordWritten = std::function<void(
    const std::vector<std::string>& tensors, std::uint64_t bytes)>;

/// Writes `state_dict` as torch.save would, with records under `archive/`;
/// `written` (when given) after each record.
void write_torch_save(
    const StateDict& state_dict,
    AtomicFile& file,
    const std::string& archive,
    const RecordWritten& written = {});

} // namespace torchser::detail
