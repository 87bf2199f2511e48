#include "torchser/detail/safetensors_format.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "torchser/detail/python_format.h"

namespace torchser {
namespace {

struct DtypeRow {
  SafetensorsDtype dtype;
  const char* name;
  int bits;
};

// The official enum, in its order (= the writer's sort rank).
constexpr std::array<DtypeRow, 22> kDtypes = {{
    {SafetensorsDtype::kBOOL, "BOOL", 8},
    {SafetensorsDtype::kF4, "F4", 4},
    {SafetensorsDtype::kF6_E2M3, "F6_E2M3", 6},
    {SafetensorsDtype::kF6_E3M2, "F6_E3M2", 6},
    {SafetensorsDtype::kU8, "U8", 8},
    {SafetensorsDtype::kI8, "I8", 8},
    {SafetensorsDtype::kF8_E5M2, "F8_E5M2", 8},
    {SafetensorsDtype::kF8_E4M3, "F8_E4M3", 8},
    {SafetensorsDtype::kF8_E8M0, "F8_E8M0", 8},
    {SafetensorsDtype::kF8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {SafetensorsDtype::kF8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {SafetensorsDtype::kI16, "I16", 16},
    {SafetensorsDtype::kU16, "U16", 16},
    {SafetensorsDtype::kF16, "F16", 16},
    {SafetensorsDtype::kBF16, "BF16", 16},
    {SafetensorsDtype::kI32, "I32", 32},
    {SafetensorsDtype::kU32, "U32", 32},
    {SafetensorsDtype::kF32, "F32", 32},
    {SafetensorsDtype::kC64, "C64", 64},
    {SafetensorsDtype::kF64, "F64", 64},
    {SafetensorsDtype::kI64, "I64", 64},
    {SafetensorsDtype::kU64, "U64", 64},
}};

const DtypeRow& row_of(SafetensorsDtype dtype) {
  return kDtypes[static_cast<std::size_t>(dtype)];
}

} // namespace

const char* safetensors_dtype_name(SafetensorsDtype dtype) {
  return row_of(dtype).name;
}

int safetensors_dtype_bits(SafetensorsDtype dtype) {
  return row_of(dtype).bits;
}

std::optional<SafetensorsDtype> parse_safetensors_dtype(std::string_view code) {
  for (const DtypeRow& row : kDtypes) {
    if (code == row.name) {
      return row.dtype;
    }
  }
  return std::nullopt;
}

namespace detail {
namespace {

using SafetensorKind = SafetensorError::Kind;
using Json = nlohmann::json;

std::string expected_variants() {
  std::string out;
  for (const DtypeRow& row : kDtypes) {
    out += out.empty() ? "`" : ", `";
    out += row.name;
    out += '`';
  }
  return out;
}

// Streams the header through nlohmann's SAX interface into tensor entries,
// with the structure of the official HashMetadata: an object whose
// `__metadata__` is null or a string → string map and whose other keys are
// {dtype, shape, data_offsets} objects (unknown fields ignored, as serde
// does). The first problem stops the parse with a serde-like message.
class HeaderSax final : public nlohmann::json_sax<Json> {
 public:
  std::optional<SafetensorsMetadata> metadata;
  std::vector<SafetensorsTensorInfo> tensors;
  std::string error; // set when a handler returned false
  SafetensorError::Kind kind =
      SafetensorError::Kind::kInvalidHeaderDeserialization;

  bool null() override {
    return scalar("null");
  }
  bool boolean(bool value) override {
    return scalar(std::string("boolean `") + (value ? "true" : "false") + "`");
  }
  bool number_integer(number_integer_t value) override {
    if (is_usize_slot()) {
      return fail(
          "invalid value: integer `" + std::to_string(value) +
          "`, expected usize");
    }
    return scalar("integer `" + std::to_string(value) + "`");
  }
  bool number_unsigned(number_unsigned_t value) override {
    const Slot slot = current_slot();
    if (slot == Slot::kShapeDim || slot == Slot::kOffset) {
      Frame& frame = stack_.back();
      ++frame.count;
      if (slot == Slot::kOffset) {
        if (frame.count > 2) {
          return fail("invalid length 3, expected a tuple of size 2");
        }
        (frame.count == 1 ? pending_.begin : pending_.end) = value;
        return true;
      }
      if (value > static_cast<std::uint64_t>(
                      std::numeric_limits<std::int64_t>::max())) {
        kind = SafetensorError::Kind::kValidationOverflow;
        return fail(
            "dimension " + std::to_string(value) + " of tensor `" +
            pending_.name + "` does not fit in a signed 64-bit size");
      }
      pending_.shape.push_back(static_cast<std::int64_t>(value));
      return true;
    }
    return scalar("integer `" + std::to_string(value) + "`");
  }
  bool number_float(number_float_t /*value*/, const string_t& text) override {
    return scalar("floating point `" + text + "`");
  }
  bool string(string_t& value) override {
    const Slot slot = current_slot();
    if (slot == Slot::kMetadataEntry) {
      (*metadata)[metadata_key_] = std::move(value);
      return true;
    }
    if (slot == Slot::kDtype) {
      const auto dtype = parse_safetensors_dtype(value);
      if (!dtype.has_value()) {
        return fail(
            "unknown variant `" + value + "`, expected one of " +
            expected_variants());
      }
      pending_.dtype = *dtype;
      return true;
    }
    return scalar("string " + python_repr(value));
  }
  bool binary(binary_t& /*value*/) override {
    return scalar("bytes");
  }

  bool start_object(std::size_t /*elements*/) override {
    if (stack_.size() >= kMaxDepth) {
      return fail("recursion limit exceeded");
    }
    switch (current_slot()) {
      case Slot::kRoot:
        stack_.push_back({Frame::kTop});
        return true;
      case Slot::kMetadata:
        metadata.emplace();
        metadata_keys_.clear();
        stack_.push_back({Frame::kMetadata});
        return true;
      case Slot::kTensor:
        stack_.push_back({Frame::kTensor});
        return true;
      case Slot::kIgnored:
        stack_.push_back({Frame::kSkip});
        return true;
      default:
        return type_error("map");
    }
  }
  bool end_object() override {
    const Frame frame = stack_.back();
    stack_.pop_back();
    if (frame.kind == Frame::kTensor) {
      for (const auto& [flag, field] :
           {std::pair{has_dtype_, "dtype"},
            std::pair{has_shape_, "shape"},
            std::pair{has_offsets_, "data_offsets"}}) {
        if (!flag) {
          return fail(
              std::string("missing field `") + field + "` in tensor `" +
              pending_.name + "`");
        }
      }
      tensors.push_back(std::move(pending_));
    }
    return true;
  }
  bool start_array(std::size_t /*elements*/) override {
    if (stack_.size() >= kMaxDepth) {
      return fail("recursion limit exceeded");
    }
    switch (current_slot()) {
      case Slot::kShape:
        stack_.push_back({Frame::kShape});
        return true;
      case Slot::kOffsets:
        stack_.push_back({Frame::kOffsets});
        return true;
      case Slot::kIgnored:
        stack_.push_back({Frame::kSkip});
        return true;
      default:
        return type_error("sequence");
    }
  }
  bool end_array() override {
    const Frame frame = stack_.back();
    stack_.pop_back();
    if (frame.kind == Frame::kOffsets && frame.count != 2) {
      return fail(
          "invalid length " + std::to_string(frame.count) +
          ", expected a tuple of size 2");
    }
    return true;
  }
  bool key(string_t& key) override {
    Frame& frame = stack_.back();
    switch (frame.kind) {
      case Frame::kTop:
        if (key == "__metadata__") {
          if (has_metadata_key_) {
            return fail("duplicate field `__metadata__`");
          }
          has_metadata_key_ = true;
          next_ = Slot::kMetadata;
          return true;
        }
        pending_ =
            SafetensorsTensorInfo{key, SafetensorsDtype::kBOOL, {}, 0, 0};
        has_dtype_ = has_shape_ = has_offsets_ = false;
        next_ = Slot::kTensor;
        return true;
      case Frame::kMetadata:
        if (!metadata_keys_.insert(key).second) {
          return fail(
              "duplicate key `" + key +
              "` in `__metadata__` (the official reader keeps the last one "
              "silently)");
        }
        metadata_key_ = key;
        next_ = Slot::kMetadataEntry;
        return true;
      case Frame::kTensor:
        return tensor_field(key);
      default: // keys of ignored objects
        return true;
    }
  }
  bool parse_error(
      std::size_t /*position*/,
      const std::string& /*last_token*/,
      const nlohmann::detail::exception& ex) override {
    std::string text = ex.what();
    // Drop nlohmann's "[json.exception.parse_error.101] " tag.
    if (!text.empty() && text.front() == '[') {
      const std::size_t close = text.find("] ");
      if (close != std::string::npos) {
        text = text.substr(close + 2);
      }
    }
    error = text;
    return false;
  }

 private:
  // serde_json's default recursion limit.
  static constexpr std::size_t kMaxDepth = 128;

  enum class Slot {
    kRoot,
    kMetadata,
    kMetadataEntry,
    kTensor,
    kDtype,
    kShape,
    kOffsets,
    kShapeDim,
    kOffset,
    kIgnored,
  };
  struct Frame {
    enum Kind { kTop, kMetadata, kTensor, kShape, kOffsets, kSkip } kind;
    std::size_t count = 0;
  };

  Slot current_slot() const {
    if (stack_.empty()) {
      return Slot::kRoot;
    }
    switch (stack_.back().kind) {
      case Frame::kShape:
        return Slot::kShapeDim;
      case Frame::kOffsets:
        return Slot::kOffset;
      case Frame::kSkip:
        return Slot::kIgnored;
      default:
        return next_;
    }
  }
  bool is_usize_slot() const {
    const Slot slot = current_slot();
    return slot == Slot::kShapeDim || slot == Slot::kOffset;
  }

  bool tensor_field(const std::string& key) {
    bool* seen = nullptr;
    if (key == "dtype") {
      seen = &has_dtype_;
      next_ = Slot::kDtype;
    } else if (key == "shape") {
      seen = &has_shape_;
      next_ = Slot::kShape;
    } else if (key == "data_offsets") {
      seen = &has_offsets_;
      next_ = Slot::kOffsets;
    } else {
      next_ = Slot::kIgnored; // serde ignores unknown fields
      return true;
    }
    if (*seen) {
      return fail(
          "duplicate field `" + key + "` in tensor `" + pending_.name + "`");
    }
    *seen = true;
    return true;
  }

  // A scalar where the slot expects something else (or nothing).
  bool scalar(const std::string& what) {
    const Slot slot = current_slot();
    if (slot == Slot::kIgnored) {
      return true;
    }
    if (slot == Slot::kMetadata && what == "null") {
      metadata.reset(); // `"__metadata__": null` means no metadata
      return true;
    }
    return type_error(what);
  }

  bool type_error(const std::string& what) {
    const char* expected = "";
    switch (current_slot()) {
      case Slot::kRoot:
        expected = "a JSON object";
        break;
      case Slot::kMetadata:
        expected = "a map of strings or null for `__metadata__`";
        break;
      case Slot::kMetadataEntry:
        expected = "a string";
        break;
      case Slot::kTensor:
        expected = "struct TensorInfo";
        break;
      case Slot::kDtype:
        expected = "a dtype code";
        break;
      case Slot::kShape:
      case Slot::kOffsets:
        expected = "a sequence";
        break;
      case Slot::kShapeDim:
      case Slot::kOffset:
        expected = "usize";
        break;
      case Slot::kIgnored:
        return true;
    }
    std::string where;
    if (current_slot() == Slot::kMetadataEntry) {
      where = " for `__metadata__` key `" + metadata_key_ + "`";
    } else if (
        current_slot() != Slot::kRoot && current_slot() != Slot::kMetadata) {
      where = " in tensor `" + pending_.name + "`";
    }
    return fail("invalid type: " + what + ", expected " + expected + where);
  }

  bool fail(std::string message) {
    error = std::move(message);
    return false;
  }

  std::vector<Frame> stack_;
  Slot next_ = Slot::kRoot;
  SafetensorsTensorInfo pending_{"", SafetensorsDtype::kBOOL, {}, 0, 0};
  bool has_dtype_ = false;
  bool has_shape_ = false;
  bool has_offsets_ = false;
  bool has_metadata_key_ = false;
  std::string metadata_key_;
  std::set<std::string> metadata_keys_;
};

void append_json_string(std::string& out, std::string_view text) {
  // serde_json's escaping: short forms for \b \f \n \r \t, \u00xx (lowercase)
  // for other controls, raw bytes for everything else (including / and
  // non-ASCII).
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 0xF];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

void require_utf8(std::string_view text, const char* what) {
  const std::size_t bad = utf8_error_position(text);
  if (bad != std::string_view::npos) {
    throw ValueError(
        std::string(what) + " " + python_repr(text) +
        " is not valid UTF-8 (byte " + std::to_string(bad) +
        "): safetensors headers are UTF-8 JSON.");
  }
}

} // namespace

void throw_safetensor_error(
    SafetensorError::Kind kind,
    const SafetensorsSource& source,
    const std::string& display,
    const std::string& detail) {
  std::string message = source.is_file ? "Error while deserializing header: "
                                       : "Error while deserializing: ";
  message += display;
  message += " (";
  message += source.description;
  if (!detail.empty()) {
    message += ": ";
    message += detail;
  }
  message += ")";
  throw SafetensorError(kind, message);
}

std::uint64_t read_header_length(
    std::string_view prefix,
    std::uint64_t file_size,
    const SafetensorsSource& source) {
  if (file_size < 8 || prefix.size() < 8) {
    throw_safetensor_error(
        SafetensorKind::kHeaderTooSmall,
        source,
        "header too small",
        "the file has " + std::to_string(file_size) +
            " bytes; the 8-byte header length alone needs 8");
  }
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) { // little-endian, whatever the host
    n = (n << 8) |
        static_cast<unsigned char>(prefix[static_cast<std::size_t>(i)]);
  }
  if (n > kMaxHeaderSize) {
    throw_safetensor_error(
        SafetensorKind::kHeaderTooLarge,
        source,
        "header too large",
        "the header length field says " + std::to_string(n) +
            " bytes; the limit is " + std::to_string(kMaxHeaderSize));
  }
  if (n > file_size - 8) {
    throw_safetensor_error(
        SafetensorKind::kInvalidHeaderLength,
        source,
        "invalid header length",
        "the header length field says " + std::to_string(n) +
            " bytes, but the file has only " + std::to_string(file_size - 8) +
            " bytes after it (perhaps an incomplete download?)");
  }
  return n;
}

ParsedHeader parse_header(
    std::string_view header,
    std::uint64_t file_size,
    const SafetensorsSource& source) {
  const std::size_t bad_utf8 = utf8_error_position(header);
  if (bad_utf8 != std::string_view::npos) {
    throw_safetensor_error(
        SafetensorKind::kInvalidHeader,
        source,
        "invalid UTF-8 in header: invalid utf-8 sequence from index " +
            std::to_string(bad_utf8),
        "");
  }
  // nlohmann skips a byte-order mark; serde_json (and so the official
  // reader) rejects it.
  if (header.size() >= 3 && header.compare(0, 3, "\xEF\xBB\xBF") == 0) {
    throw_safetensor_error(
        SafetensorKind::kInvalidHeaderDeserialization,
        source,
        "invalid JSON in header: expected value at line 1 column 1",
        "the header starts with a UTF-8 byte-order mark");
  }
  // nlohmann stops at a NUL byte as if the input ended there, so NUL padding
  // would pass; in JSON a raw NUL is never valid (serde_json: "trailing
  // characters" or "control character").
  const std::size_t nul = header.find('\0');
  if (nul != std::string_view::npos) {
    throw_safetensor_error(
        SafetensorKind::kInvalidHeaderDeserialization,
        source,
        "invalid JSON in header: NUL byte at offset " + std::to_string(nul),
        "only spaces, tabs and newlines may pad a header");
  }
  HeaderSax sax;
  const bool ok = Json::sax_parse(
      header.begin(),
      header.end(),
      &sax,
      nlohmann::detail::input_format_t::json,
      /*strict=*/true,
      /*ignore_comments=*/false);
  if (!ok) {
    if (sax.kind == SafetensorKind::kValidationOverflow) {
      throw_safetensor_error(
          sax.kind,
          source,
          "overflow computing buffer size from shape and/or element type",
          sax.error);
    }
    throw_safetensor_error(
        SafetensorKind::kInvalidHeaderDeserialization,
        source,
        "invalid JSON in header: " + sax.error,
        "");
  }

  ParsedHeader parsed;
  parsed.header_size = header.size();
  parsed.data_start = 8 + header.size();
  parsed.metadata = std::move(sax.metadata);
  parsed.tensors = std::move(sax.tensors);

  // The official reader sorts by (begin, end) and requires the tensors to
  // tile the data buffer from 0 (Metadata::validate).
  std::stable_sort(
      parsed.tensors.begin(),
      parsed.tensors.end(),
      [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
        return std::pair(a.begin, a.end) < std::pair(b.begin, b.end);
      });
  parsed.index.reserve(parsed.tensors.size());
  for (std::size_t i = 0; i < parsed.tensors.size(); ++i) {
    if (parsed.index.contains(parsed.tensors[i].name)) {
      throw_safetensor_error(
          SafetensorKind::kInvalidHeaderDeserialization,
          source,
          "invalid JSON in header: duplicate tensor name `" +
              parsed.tensors[i].name + "`",
          "the official reader keeps the last one silently; torchser "
          "refuses the ambiguity");
    }
    parsed.index.insert(parsed.tensors[i].name, i);
  }
  std::uint64_t start = 0;
  for (const SafetensorsTensorInfo& t : parsed.tensors) {
    if (t.begin != start || t.end < t.begin) {
      throw_safetensor_error(
          SafetensorKind::kInvalidOffset,
          source,
          "invalid offset for tensor `" + t.name + "`",
          "data_offsets [" + std::to_string(t.begin) + ", " +
              std::to_string(t.end) + "], but the data before it ends at " +
              std::to_string(start) +
              "; tensors must cover the data buffer without gaps or overlaps");
    }
    start = t.end;
    std::uint64_t elements = 1;
    bool overflow = false;
    for (const std::int64_t dim : t.shape) {
      overflow =
          overflow || __builtin_mul_overflow(
                          elements, static_cast<std::uint64_t>(dim), &elements);
    }
    std::uint64_t bits = 0;
    overflow = overflow ||
               __builtin_mul_overflow(
                   elements,
                   static_cast<std::uint64_t>(safetensors_dtype_bits(t.dtype)),
                   &bits);
    if (overflow) {
      throw_safetensor_error(
          SafetensorKind::kValidationOverflow,
          source,
          "overflow computing buffer size from shape and/or element type",
          "tensor `" + t.name + "`");
    }
    if (bits % 8 != 0) {
      throw_safetensor_error(
          SafetensorKind::kMisalignedSlice,
          source,
          "The slice is slicing for subbytes dtypes, and the slice does not "
          "end up at a byte boundary, this is invalid.",
          "tensor `" + t.name + "` has " + std::to_string(bits) + " bits");
    }
    if (t.end - t.begin != bits / 8) {
      throw_safetensor_error(
          SafetensorKind::kTensorInvalidInfo,
          source,
          "invalid shape, data type, or offset for tensor",
          "tensor `" + t.name + "` (" + safetensors_dtype_name(t.dtype) +
              ") needs " + std::to_string(bits / 8) +
              " bytes, but its data_offsets span " +
              std::to_string(t.end - t.begin));
    }
  }
  parsed.data_size = start;
  std::uint64_t expected = 0;
  if (__builtin_add_overflow(start, parsed.data_start, &expected) ||
      expected != file_size) {
    throw_safetensor_error(
        SafetensorKind::kMetadataIncompleteBuffer,
        source,
        "incomplete metadata, file not fully covered",
        "the header describes " + std::to_string(start) +
            " data bytes, so the file should have " +
            (expected >= start ? std::to_string(expected) : "more") +
            " bytes, but it has " + std::to_string(file_size) +
            (expected > file_size ? " (perhaps an incomplete download?)"
                                  : " (trailing bytes)"));
  }
  return parsed;
}

bool writer_order_less(
    const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
  if (a.dtype != b.dtype) {
    return a.dtype > b.dtype; // enum order, descending
  }
  return a.name < b.name; // std::string compares bytes as unsigned char
}

std::string build_header(
    const std::optional<SafetensorsMetadata>& metadata,
    const std::vector<SafetensorsTensorInfo>& tensors) {
  std::string json = "{";
  if (metadata.has_value()) {
    json += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : *metadata) {
      require_utf8(key, "Metadata key");
      require_utf8(value, "Metadata value");
      if (!first) {
        json += ',';
      }
      first = false;
      append_json_string(json, key);
      json += ':';
      append_json_string(json, value);
    }
    json += '}';
    if (!tensors.empty()) {
      json += ',';
    }
  }
  bool first = true;
  for (const SafetensorsTensorInfo& t : tensors) {
    if (t.name == "__metadata__") {
      throw ValueError(
          "A tensor cannot be named `__metadata__`: the safetensors header "
          "reserves that key for metadata, and readers would reject the "
          "file.");
    }
    require_utf8(t.name, "Tensor name");
    if (!first) {
      json += ',';
    }
    first = false;
    append_json_string(json, t.name);
    json += ":{\"dtype\":\"";
    json += safetensors_dtype_name(t.dtype);
    json += "\",\"shape\":[";
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      if (d > 0) {
        json += ',';
      }
      json += std::to_string(t.shape[d]);
    }
    json += "],\"data_offsets\":[";
    json += std::to_string(t.begin);
    json += ',';
    json += std::to_string(t.end);
    json += "]}";
  }
  json += '}';
  json.resize((json.size() + 7) / 8 * 8, ' ');
  return json;
}

} // namespace detail
} // namespace torchser
