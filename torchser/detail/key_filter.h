#pragma once

// LoadOptions::prefixes and ignore_keys, as every loader applies them.
// Never installed.

#include <algorithm>
#include <regex>
#include <string>
#include <vector>

#include <torchser/errors.h>
#include <torchser/load.h>

namespace torchser::detail {

// Which checkpoint tensors a load takes (LoadOptions::prefixes) and which
// module names it never reports (LoadOptions::ignore_keys).
class KeyFilter {
 public:
  explicit KeyFilter(const LoadOptions& options)
      : prefixes_(options.prefixes()) {
    for (const std::string& pattern : options.ignore_keys()) {
      try {
        ignore_.emplace_back(pattern, std::regex::ECMAScript);
      } catch (const std::regex_error& e) {
        throw ValueError(
            "LoadOptions::ignore_keys: '" + pattern +
            "' is not a valid regular expression: " + e.what());
      }
    }
  }
  bool selected(const std::string& checkpoint_key) const {
    return prefixes_.empty() ||
           std::any_of(
               prefixes_.begin(), prefixes_.end(), [&](const std::string& p) {
                 return checkpoint_key.compare(0, p.size(), p) == 0;
               });
  }
  bool ignored(const std::string& module_key) const {
    return std::any_of(ignore_.begin(), ignore_.end(), [&](const auto& re) {
      return std::regex_search(module_key, re);
    });
  }

 private:
  std::vector<std::string> prefixes_;
  std::vector<std::regex> ignore_;
};

} // namespace torchser::detail
