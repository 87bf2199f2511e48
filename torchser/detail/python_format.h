#pragma once

// Python's renderings of values in messages, and the subset of str.format
// that file-name patterns use. Never installed; exported from the library
// only so that the tests can reach it.

#include <string>
#include <string_view>
#include <vector>

#include <torchser/export.h>

namespace torchser::detail {

/// Python's repr() of a str: 'abc', "it's", with Python's escapes. Bytes that
/// are not valid UTF-8 are shown as \xNN.
TORCHSER_API std::string python_repr(std::string_view text);

/// Position of the first byte of `text` that does not start a valid UTF-8
/// sequence (overlong forms, surrogates and values past U+10FFFF are
/// invalid), or std::string_view::npos when all of it is valid.
TORCHSER_API std::size_t utf8_error_position(std::string_view text);

/// Python's str.strip() with no argument: removes leading and trailing
/// characters for which str.isspace() is true (ASCII and Unicode spaces).
TORCHSER_API std::string_view python_strip(std::string_view text);

/// A file-name pattern such as "model{suffix}.safetensors", parsed once.
///
/// Python formats patterns with str.format(suffix=...). torchser supports the
/// part of that grammar patterns need: the `{suffix}` field (any number of
/// times) and the `{{` / `}}` escapes. Any other replacement field, or a lone
/// brace, is a ValueError here (Python raises KeyError / IndexError /
/// ValueError for those).
class TORCHSER_API FilenamePattern {
 public:
  explicit FilenamePattern(std::string_view pattern);

  /// The pattern with every `{suffix}` replaced by `suffix`.
  std::string format(std::string_view suffix) const;
  /// Whether the pattern has at least one `{suffix}` field.
  bool has_suffix() const noexcept {
    return literals_.size() > 1;
  }
  const std::string& pattern() const noexcept {
    return pattern_;
  }

 private:
  std::string pattern_;
  // The text between suffix fields, escapes already resolved:
  // literals_[0] {suffix} literals_[1] ... {suffix} literals_[n].
  std::vector<std::string> literals_;
};

} // namespace torchser::detail
