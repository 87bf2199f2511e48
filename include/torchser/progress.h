#pragma once

/// \file
/// Progress reports of long operations (saving; the CLI's convert): called
/// from the copy loops, after each tensor's bytes went through, so a caller
/// can draw a bar or release what it no longer needs.

#include <cstdint>
#include <functional>
#include <string>

namespace torchser {

/// Where a save is, after one more tensor.
struct Progress {
  /// The file being written, by its name in the checkpoint.
  std::string file;
  /// The tensor just written.
  std::string tensor;
  /// Bytes of tensor data written so far.
  std::uint64_t bytes_done = 0;
  /// Bytes of tensor data the whole operation writes.
  std::uint64_t bytes_total = 0;
};

/// Called once per tensor, from whichever thread wrote it, never two at a
/// time. An exception it throws aborts the operation (nothing is committed).
using ProgressCallback = std::function<void(const Progress&)>;

} // namespace torchser
