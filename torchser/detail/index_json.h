#pragma once

// The index file (`<pattern>.index.json`) exactly as huggingface_hub writes
// it: Python's json.dump(..., indent=2) with ensure_ascii. Never installed;
// exported for the tests.

#include <string>
#include <string_view>

#include <torchser/export.h>
#include <torchser/save.h>
#include <torchser/split.h>

namespace torchser::detail {

/// A JSON string as Python's json module writes it with ensure_ascii: quotes,
/// backslashes and \b \f \n \r \t escaped, every other character outside
/// ' '..'~' as \uXXXX (lowercase; surrogate pairs past U+FFFF). Invalid UTF-8
/// is a ValueError.
TORCHSER_API std::string python_json_string(std::string_view text);

/// {"metadata": {"total_size": N, ...metadata}, "weight_map": {...}} with
/// indent 2 and no trailing newline. A "total_size" key in `metadata` replaces
/// the computed value in its (first) position.
TORCHSER_API std::string index_json(const StateDictSplit& split, const Metadata& metadata);

} // namespace torchser::detail
