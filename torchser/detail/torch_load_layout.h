#pragma once

// Where the tensors of a torch.save archive lie in the file, for readers
// that fetch byte ranges themselves (a resharding load). Never installed.

#include <cstdint>
#include <filesystem>

#include <torchser/export.h>
#include <torchser/pickle.h>

#include "torchser/detail/file.h"

namespace torchser::detail {

/// The address of a layout's stand-in storage is this plus the file offset
/// of its record's data. Far above any real mapping, and never read.
inline constexpr std::uintptr_t kLayoutBase = std::uintptr_t{1} << 46;

/// torch_load() of `path` without reading any record: each storage is a
/// stand-in at kLayoutBase + its record's data offset, so that a tensor's
/// first element lies at `data_ptr() - kLayoutBase` in the file (its
/// storage offset, sizes and strides as the pickle gives them). Only the
/// ZIP directory and the pickle are read. Errors as torch_load(). With
/// `opened` (`path` open for reading), that very file is read, so that a
/// reader of its records can be sure they are the file the layout describes.
TORCHSER_API PickleValue torch_load_layout(
    const std::filesystem::path& path, const File* opened = nullptr);

} // namespace torchser::detail
