#include "torchser/detail/index_json.h"

#include <cstdio>

#include <torchser/errors.h>

#include "torchser/detail/python_format.h"

namespace torchser::detail {
namespace {

void append_u_escape(std::string& out, unsigned value) {
  char buffer[16];
  std::snprintf(buffer, sizeof buffer, "\\u%04x", value & 0xFFFFu);
  out += buffer;
}

} // namespace

std::string python_json_string(std::string_view text) {
  const std::size_t bad = utf8_error_position(text);
  if (bad != std::string_view::npos) {
    throw ValueError("Cannot write " + python_repr(text) + " to a JSON index: it is not valid UTF-8.");
  }
  std::string out = "\"";
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20 || c == 0x7F) {
            append_u_escape(out, c);
          } else {
            out += static_cast<char>(c);
          }
      }
      ++i;
      continue;
    }
    // Decode one (already validated) UTF-8 sequence.
    const std::size_t length = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
    unsigned cp = c & (length == 2 ? 0x1F : length == 3 ? 0x0F : 0x07);
    for (std::size_t k = 1; k < length; ++k) {
      cp = (cp << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3F);
    }
    if (cp >= 0x10000) {
      cp -= 0x10000;
      append_u_escape(out, 0xD800 + (cp >> 10));
      append_u_escape(out, 0xDC00 + (cp & 0x3FF));
    } else {
      append_u_escape(out, cp);
    }
    i += length;
  }
  return out + "\"";
}

std::string index_json(const StateDictSplit& split, const Metadata& metadata) {
  std::string out = "{\n  \"metadata\": {\n    \"total_size\": ";
  if (const std::string* user_total = metadata.find("total_size"); user_total != nullptr) {
    out += python_json_string(*user_total);
  } else {
    out += std::to_string(split.metadata.total_size);
  }
  for (const auto& item : metadata) {
    if (item.key() == "total_size") {
      continue;
    }
    out += ",\n    " + python_json_string(item.key()) + ": " + python_json_string(item.value());
  }
  out += "\n  },\n  \"weight_map\": {";
  bool first = true;
  for (const auto& item : split.tensor_to_filename) {
    out += first ? "\n    " : ",\n    ";
    first = false;
    out += python_json_string(item.key()) + ": " + python_json_string(item.value());
  }
  out += first ? "}\n}" : "\n  }\n}";
  return out;
}

} // namespace torchser::detail
