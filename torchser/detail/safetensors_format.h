#pragma once

// The safetensors format without LibTorch: header length, header JSON
// parsing and every validation rule of the official reader, and the writer's
// byte-exact header. Never installed; exported for the tests and fuzzers.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <torchser/errors.h>
#include <torchser/export.h>
#include <torchser/ordered_map.h>
#include <torchser/safetensors.h>

namespace torchser::detail {

/// Where bytes come from, for messages: a file (the official binding says
/// "Error while deserializing header: ...") or a buffer ("Error while
/// deserializing: ...").
struct SafetensorsSource {
  std::string description; ///< "file '/x/model.safetensors'"
  bool is_file;
};

/// Throws the SafetensorError of `kind`: `display` is the official reader's
/// text for the rule, `detail` what torchser found.
[[noreturn]] TORCHSER_API void throw_safetensor_error(
    SafetensorError::Kind kind,
    const SafetensorsSource& source,
    const std::string& display,
    const std::string& detail);

/// Same 100 MB cap as the official reader and writer.
inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

/// A validated header.
struct TORCHSER_API ParsedHeader {
  std::optional<SafetensorsMetadata> metadata;
  /// Tensors in data order (sorted by offsets).
  std::vector<SafetensorsTensorInfo> tensors;
  /// Name → position in `tensors`.
  OrderedMap<std::size_t> index;
  std::uint64_t header_size = 0; ///< N
  std::uint64_t data_start = 0;  ///< 8 + N
  std::uint64_t data_size = 0;   ///< end of the last tensor
};

/// Rules 1–5: reads N from the first 8 bytes of a file of `file_size` bytes
/// (`prefix` holds min(8, file_size) bytes) and checks it against the size.
TORCHSER_API std::uint64_t read_header_length(
    std::string_view prefix,
    std::uint64_t file_size,
    const SafetensorsSource& source);

/// Rules 6–10: parses and validates the N header bytes of a file of
/// `file_size` bytes. Stricter than the official reader on purpose: duplicate
/// tensor names and duplicate metadata keys are rejected (the official
/// reader keeps the last one silently), as are dimensions past 2^63 − 1.
TORCHSER_API ParsedHeader parse_header(
    std::string_view header,
    std::uint64_t file_size,
    const SafetensorsSource& source);

/// The writer's header: compact serde_json-style JSON with `__metadata__`
/// first, then `tensors` in the given order, padded with spaces to a
/// multiple of 8. Throws ValueError for names or metadata that are not valid
/// UTF-8 and for a tensor named `__metadata__`.
TORCHSER_API std::string build_header(
    const std::optional<SafetensorsMetadata>& metadata,
    const std::vector<SafetensorsTensorInfo>& tensors);

/// The official writer's order: dtype rank descending, then name byte-wise.
TORCHSER_API bool writer_order_less(
    const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b);

class DirectFile;

/// What the checkpoint layer reads of a SafeOpen beyond its public face.
struct TORCHSER_API SafeOpenAccess {
  /// Its kDirect reader (nullptr for the other backends): the file whose
  /// header it parsed.
  static const DirectFile* direct(const SafeOpen& file);
};

} // namespace torchser::detail
