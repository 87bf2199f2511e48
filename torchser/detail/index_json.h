#pragma once

// The index file (`<pattern>.index.json`) exactly as huggingface_hub writes
// it: Python's json.dump(..., indent=2) with ensure_ascii. Never installed;
// exported for the tests.

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torchser/export.h>
#include <torchser/split.h>
#include <torchser/state_dict.h>

namespace torchser::detail {

/// A JSON string as Python's json module writes it with ensure_ascii: quotes,
/// backslashes and \b \f \n \r \t escaped, every other character outside
/// ' '..'~' as \uXXXX (lowercase; surrogate pairs past U+FFFF). Invalid UTF-8
/// is a ValueError.
TORCHSER_API std::string python_json_string(std::string_view text);

/// {"metadata": {"total_size": N, ...metadata}, "weight_map": {...}} with
/// indent 2 and no trailing newline. A "total_size" key in `metadata` replaces
/// the computed value in its (first) position.
TORCHSER_API std::string index_json(
    const StateDictSplit& split, const Metadata& metadata);

/// What a checkpoint's index says, validated: every shard name is a relative
/// path inside the directory (no root, drive or ".." component, no NUL) with
/// the expected extension, before anything opens a shard.
struct TORCHSER_API IndexFile {
  /// Shard name → its tensor names, shards in sorted order.
  std::map<std::string, std::vector<std::string>> shards;
  /// Every tensor name.
  std::set<std::string> keys;
  /// The string values of "metadata" (aliases of tied weights, "format").
  std::vector<std::pair<std::string, std::string>> metadata;
  /// Its other values ("total_size"), as JSON text.
  std::vector<std::pair<std::string, std::string>> other_metadata;
};

/// Parses index JSON `text` read from `index_path` (named in messages).
/// `expected_extension` (".safetensors", ".bin"; empty: any) is the suffix
/// every shard name must have. Throws ValueError naming the index file and
/// what is wrong (bad JSON, no "weight_map" object, a non-string shard, an
/// escaping or mistyped shard name).
TORCHSER_API IndexFile parse_index(
    std::string_view text,
    const std::string& index_path,
    std::string_view expected_extension);

/// parse_index() of the file at `index_path` (OSError when unreadable).
TORCHSER_API IndexFile read_index(
    const std::filesystem::path& index_path,
    std::string_view expected_extension);

/// Whether a shard name would leave its directory: a CPython 3.12
/// PureWindowsPath drive or root (the reference's rule), or a ".." component.
TORCHSER_API bool escapes_directory(std::string_view shard);

} // namespace torchser::detail
