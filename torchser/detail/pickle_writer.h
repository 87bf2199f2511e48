#pragma once

// torch.save's zip format written into a file the caller commits (a sharded
// save commits several files at once). Never installed.

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include <torchser/state_dict.h>

#include "torchser/detail/file.h"

namespace torchser::detail {

/// Names of the tensors a record holds and its bytes, after it was written.
using RecordWritten = std::function<void(
    const std::vector<std::string>& tensors, std::uint64_t bytes)>;

/// One storage of a torch.save archive: its bytes are a record.
struct TorchSaveRecord {
  at::Tensor storage; ///< any tensor on it: the bytes are taken whole
  at::ScalarType dtype;
  std::int64_t numel;
  std::vector<std::string> names; ///< the tensors on it
  std::uint64_t nbytes() const;
};

/// What torch.save writes for a state dict, before any byte of data: the
/// pickle (data.pkl) and the storages, in first-use order. ValueError for
/// tensors torch.save cannot hold.
struct TorchSaveArchive {
  std::string folder; ///< the entries' folder, after the file
  std::string pickle;
  std::vector<TorchSaveRecord> records;
};
TorchSaveArchive torch_save_archive(
    const StateDict& state_dict, const std::string& folder);

/// Writes `state_dict` as torch.save would, with records under `folder/`;
/// `written` (when given) after each record.
void write_torch_save(
    const StateDict& state_dict,
    AtomicFile& file,
    const std::string& folder,
    const RecordWritten& written = {});

/// The archive's layout, for writers that put each record's bytes at its
/// offset themselves (a distributed save): every byte that is not record
/// data, as (offset, bytes) runs, each record's first byte, and the size.
/// `crcs` are the records' CRC-32s, zeros while not yet known; the runs are
/// written again once they are.
struct TorchSaveLayout {
  std::vector<std::pair<std::uint64_t, std::string>> fixed;
  std::vector<std::uint64_t> data_offset;
  std::uint64_t size = 0;
};
TorchSaveLayout torch_save_layout(
    const TorchSaveArchive& archive, const std::vector<std::uint32_t>& crcs);

} // namespace torchser::detail
