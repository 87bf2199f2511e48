#include "torchser/detail/python_format.h"

#include <cstdint>
#include <cstdio>
#include <cstring>

#include <torchser/errors.h>

namespace torchser::detail {
namespace {

// Decodes one UTF-8 code point at text[i]. Returns its length in bytes, or 0
// when the bytes there are not valid UTF-8 (overlong forms, surrogates and
// values past U+10FFFF included).
std::size_t decode_utf8(std::string_view text, std::size_t i, char32_t& out) {
  const auto byte = [&](std::size_t k) {
    return static_cast<unsigned char>(text[k]);
  };
  const unsigned char lead = byte(i);
  if (lead < 0x80) {
    out = lead;
    return 1;
  }
  std::size_t length = 0;
  char32_t cp = 0;
  char32_t min = 0;
  if ((lead & 0xE0) == 0xC0) {
    length = 2, cp = lead & 0x1F, min = 0x80;
  } else if ((lead & 0xF0) == 0xE0) {
    length = 3, cp = lead & 0x0F, min = 0x800;
  } else if ((lead & 0xF8) == 0xF0) {
    length = 4, cp = lead & 0x07, min = 0x10000;
  } else {
    return 0;
  }
  if (text.size() - i < length) {
    return 0;
  }
  for (std::size_t k = 1; k < length; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) {
      return 0;
    }
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    return 0;
  }
  out = cp;
  return length;
}

// str.isspace(): Unicode White_Space plus the ASCII separators \x1c-\x1f.
bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Python's repr() escapes non-printable code points. Full printability needs
// the Unicode tables; the Latin-1 controls, NBSP, the soft hyphen and the
// separators above cover what file names and sizes realistically contain.
bool is_python_printable(char32_t c) {
  if (c < 0x20 || c == 0x7F || (c >= 0x80 && c <= 0xA0) || c == 0xAD) {
    return false;
  }
  return c == ' ' || !is_python_space(c);
}

void append_hex_escape(std::string& out, char32_t c) {
  char buffer[12];
  if (c <= 0xFF) {
    std::snprintf(buffer, sizeof buffer, "\\x%02x", static_cast<unsigned>(c));
  } else if (c <= 0xFFFF) {
    std::snprintf(buffer, sizeof buffer, "\\u%04x", static_cast<unsigned>(c));
  } else {
    std::snprintf(buffer, sizeof buffer, "\\U%08x", static_cast<unsigned>(c));
  }
  out += buffer;
}

} // namespace

std::size_t utf8_error_position(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    // ASCII fast path: eight bytes at a time.
    while (i + 8 <= text.size()) {
      std::uint64_t chunk = 0;
      std::memcpy(&chunk, text.data() + i, 8);
      if ((chunk & 0x8080808080808080ULL) != 0) {
        break;
      }
      i += 8;
    }
    if (i >= text.size()) {
      break;
    }
    char32_t c = 0;
    const std::size_t length = decode_utf8(text, i, c);
    if (length == 0) {
      return i;
    }
    i += length;
  }
  return std::string_view::npos;
}

std::string python_repr(std::string_view text) {
  const bool has_single = text.find('\'') != std::string_view::npos;
  const bool has_double = text.find('"') != std::string_view::npos;
  const char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out;
  out.reserve(text.size() + 2);
  out += quote;
  for (std::size_t i = 0; i < text.size();) {
    char32_t c = 0;
    const std::size_t length = decode_utf8(text, i, c);
    if (length == 0) {
      append_hex_escape(out, static_cast<unsigned char>(text[i]));
      ++i;
      continue;
    }
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (!is_python_printable(c)) {
      append_hex_escape(out, c);
    } else {
      out.append(text.substr(i, length));
    }
    i += length;
  }
  out += quote;
  return out;
}

std::string_view python_strip(std::string_view text) {
  std::size_t begin = 0;
  while (begin < text.size()) {
    char32_t c = 0;
    const std::size_t length = decode_utf8(text, begin, c);
    if (length == 0 || !is_python_space(c)) {
      break;
    }
    begin += length;
  }
  std::size_t end = text.size();
  while (end > begin) {
    // Step back to the start of the last code point.
    std::size_t start = end - 1;
    while (start > begin &&
           (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) {
      --start;
    }
    char32_t c = 0;
    const std::size_t length = decode_utf8(text, start, c);
    if (length != end - start || !is_python_space(c)) {
      break;
    }
    end = start;
  }
  return text.substr(begin, end - begin);
}

FilenamePattern::FilenamePattern(std::string_view pattern)
    : pattern_(pattern), literals_(1) {
  const auto fail = [&](const std::string& reason) {
    throw ValueError(
        "Invalid filename_pattern '" + pattern_ + "': " + reason +
        " torchser substitutes only '{suffix}' ('{{' and '}}' stand for "
        "literal braces).");
  };
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '}') {
      if (i + 1 < pattern.size() && pattern[i + 1] == '}') {
        literals_.back() += '}';
        ++i;
        continue;
      }
      fail("single '}' encountered in format string.");
    }
    if (c != '{') {
      literals_.back() += c;
      continue;
    }
    if (i + 1 < pattern.size() && pattern[i + 1] == '{') {
      literals_.back() += '{';
      ++i;
      continue;
    }
    const std::size_t close = pattern.find('}', i + 1);
    if (close == std::string_view::npos) {
      fail("single '{' encountered in format string.");
    }
    const std::string_view field = pattern.substr(i + 1, close - i - 1);
    if (field != "suffix") {
      fail("unsupported replacement field '{" + std::string(field) + "}'.");
    }
    literals_.emplace_back();
    i = close;
  }
}

std::string FilenamePattern::format(std::string_view suffix) const {
  std::string out = literals_.front();
  for (std::size_t k = 1; k < literals_.size(); ++k) {
    out += suffix;
    out += literals_[k];
  }
  return out;
}

} // namespace torchser::detail
