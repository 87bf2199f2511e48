#include "torchser/detail/index_json.h"

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <torchser/errors.h>
#include <nlohmann/json.hpp>

#include "torchser/detail/file.h"
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
    throw ValueError(
        "Cannot write " + python_repr(text) +
        " to a JSON index: it is not valid UTF-8.");
  }
  std::string out = "\"";
  for (std::size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
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
  if (const std::string* user_total = metadata.find("total_size");
      user_total != nullptr) {
    out += python_json_string(*user_total);
  } else {
    out += std::to_string(split.metadata.total_size);
  }
  for (const auto& item : metadata) {
    if (item.key() == "total_size") {
      continue;
    }
    out += ",\n    " + python_json_string(item.key()) + ": " +
           python_json_string(item.value());
  }
  out += "\n  },\n  \"weight_map\": {";
  bool first = true;
  for (const auto& item : split.tensor_to_filename) {
    out += first ? "\n    " : ",\n    ";
    first = false;
    out += python_json_string(item.key()) + ": " +
           python_json_string(item.value());
  }
  out += first ? "}\n}" : "\n  }\n}";
  return out;
}

// A CPython 3.12 PureWindowsPath drive or root, or a ".." component (§3.G).
bool escapes_directory(std::string_view shard) {
  if (!shard.empty() && (shard[0] == '/' || shard[0] == '\\')) {
    return true; // root, or UNC \\server\share
  }
  // The second code point ':' makes a drive in 3.12+ (any first character).
  std::size_t first = 1;
  while (first < shard.size() &&
         (static_cast<unsigned char>(shard[first]) & 0xC0) == 0x80) {
    ++first;
  }
  if (first < shard.size() && shard[first] == ':') {
    return true;
  }
  std::size_t start = 0;
  while (start <= shard.size()) {
    const std::size_t end = shard.find_first_of("/\\", start);
    const std::string_view part = shard.substr(
        start, end == std::string::npos ? std::string::npos : end - start);
    if (part == "..") {
      return true;
    }
    if (end == std::string::npos) {
      break;
    }
    start = end + 1;
  }
  return false;
}

IndexFile parse_index(
    std::string_view text,
    const std::string& index_path,
    std::string_view expected_extension) {
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw ValueError("Invalid index file '" + index_path + "': " + e.what());
  }
  if (!index.is_object() || !index.contains("weight_map") ||
      !index["weight_map"].is_object()) {
    throw ValueError(
        "Invalid index file '" + index_path +
        "': it has no \"weight_map\" object.");
  }
  IndexFile out;
  for (const auto& [key, file] : index["weight_map"].items()) {
    if (!file.is_string()) {
      throw ValueError(
          "Invalid index file '" + index_path + "': the shard of '" + key +
          "' is not a string.");
    }
    out.shards[file.get<std::string>()].push_back(key);
    out.keys.insert(key);
  }
  for (const auto& [shard, keys] : out.shards) {
    if (escapes_directory(shard)) {
      throw ValueError(
          "Invalid shard filename '" + shard + "' in index file '" +
          index_path +
          "'. Shard filenames must be relative paths without '..' components.");
    }
    if (shard.empty() || shard.find('\0') != std::string::npos) {
      // A NUL would cut the name short when the file is opened.
      throw ValueError(
          "Invalid shard filename " + python_repr(shard) + " in index file '" +
          index_path +
          "'. Shard filenames must be non-empty and free of NUL characters.");
    }
    if (shard.size() < expected_extension.size() ||
        shard.compare(
            shard.size() - expected_extension.size(),
            expected_extension.size(),
            expected_extension) != 0) {
      throw ValueError(
          "Invalid shard filename '" + shard + "' in index file '" +
          index_path + "'. Expected '" + std::string(expected_extension) +
          "' extension to match the index format.");
    }
  }
  if (index.contains("metadata") && index["metadata"].is_object()) {
    for (const auto& [key, value] : index["metadata"].items()) {
      if (value.is_string()) {
        out.metadata.emplace_back(key, value.get<std::string>());
      } else {
        out.other_metadata.emplace_back(key, value.dump());
      }
    }
  }
  return out;
}

IndexFile read_index(
    const std::filesystem::path& index_path,
    std::string_view expected_extension) {
  std::ifstream in(index_path, std::ios::binary);
  if (!in) {
    throw_os_error("Cannot read index file", index_path, errno);
  }
  std::ostringstream text;
  text << in.rdbuf();
  return parse_index(text.str(), index_path.string(), expected_extension);
}

} // namespace torchser::detail
