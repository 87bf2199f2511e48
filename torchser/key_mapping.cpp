#include <torchser/key_mapping.h>

#include <map>
#include <regex>

#include <torchser/errors.h>

namespace torchser {
namespace {

// "$NN": ECMAScript reads at most two digits, so a group reference followed
// by a literal digit (Python's "\g<1>0") stays group 1 and then "0".
std::string group_reference(const std::string& digits) {
  return "$" + std::string(digits.size() == 1 ? "0" : "") + digits;
}

// Python's re.sub group references (\1, \g<1>, \\) in ECMAScript's format
// ($1); ECMAScript's own $-references pass through.
std::string ecmascript_format(const std::string& python) {
  std::string out;
  for (std::size_t i = 0; i < python.size(); ++i) {
    const char c = python[i];
    if (c != '\\' || i + 1 == python.size()) {
      out += c;
      continue;
    }
    const char next = python[i + 1];
    if (next >= '0' && next <= '9') {
      // Python reads up to two digits (\12 is group 12).
      std::size_t digits = 1;
      if (i + 2 < python.size() && python[i + 2] >= '0' &&
          python[i + 2] <= '9') {
        digits = 2;
      }
      out += group_reference(python.substr(i + 1, digits));
      i += digits;
    } else if (next == 'g' && i + 2 < python.size() && python[i + 2] == '<') {
      const std::size_t close = python.find('>', i + 3);
      if (close == std::string::npos) {
        throw ValueError(
            "KeyMapping replacement '" + python + "': unterminated \\g<");
      }
      const std::string group = python.substr(i + 3, close - i - 3);
      if (group.empty() ||
          group.find_first_not_of("0123456789") != std::string::npos) {
        throw ValueError(
            "KeyMapping replacement '" + python +
            "': only numbered groups are supported (std::regex has no named "
            "groups), not \\g<" +
            group + ">");
      }
      if (group.size() > 2) {
        throw ValueError(
            "KeyMapping replacement '" + python +
            "': std::regex has at most 99 groups, not \\g<" + group + ">");
      }
      out += group_reference(group);
      i = close;
    } else if (next == '\\') {
      out += '\\';
      ++i;
    } else {
      out += c;
    }
  }
  return out;
}

struct CompiledRename {
  std::regex pattern;
  std::string format;
};

std::vector<CompiledRename> compile(const KeyMapping& mapping) {
  std::vector<CompiledRename> out;
  for (const auto& [pattern, replacement] : mapping.renames()) {
    try {
      out.push_back(
          {std::regex(pattern, std::regex::ECMAScript),
           ecmascript_format(replacement)});
    } catch (const std::regex_error& e) {
      throw ValueError(
          "KeyMapping pattern '" + pattern +
          "' is not a valid regular expression: " + e.what());
    }
  }
  return out;
}

std::optional<std::string> apply(
    std::string key,
    const KeyMapping& mapping,
    const std::vector<CompiledRename>& renames) {
  const std::string& strip = mapping.strip_prefix();
  if (!strip.empty() && key.compare(0, strip.size(), strip) == 0) {
    key.erase(0, strip.size());
  }
  for (const CompiledRename& rename : renames) {
    key = std::regex_replace(key, rename.pattern, rename.format);
  }
  key = mapping.add_prefix() + key;
  if (mapping.rename_with()) {
    return mapping.rename_with()(key);
  }
  return key;
}

} // namespace

KeyMapping KeyMapping::inverse() const {
  if (!renames_.empty() || rename_with_) {
    throw ValueError(
        "KeyMapping::inverse: only strip_prefix / add_prefix mappings have an "
        "inverse; write the other direction's renames and callback "
        "explicitly");
  }
  return KeyMapping().strip_prefix(add_prefix_).add_prefix(strip_prefix_);
}

std::optional<std::string> map_key(
    const std::string& key, const KeyMapping& mapping) {
  return apply(key, mapping, compile(mapping));
}

std::vector<std::pair<std::string, std::string>> map_keys(
    const std::vector<std::string>& keys,
    const KeyMapping& mapping,
    const std::string& where) {
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(keys.size());
  if (mapping.empty()) {
    for (const std::string& key : keys) {
      out.emplace_back(key, key);
    }
    return out;
  }
  const std::vector<CompiledRename> renames = compile(mapping);
  std::map<std::string, std::string> source_of;
  for (const std::string& key : keys) {
    std::optional<std::string> mapped = apply(key, mapping, renames);
    if (!mapped.has_value()) {
      continue;
    }
    const auto [it, inserted] = source_of.emplace(*mapped, key);
    if (!inserted) {
      throw ValueError(
          "KeyMapping maps both '" + it->second + "' and '" + key + "' of " +
          where + " to '" + *mapped + "'");
    }
    out.emplace_back(key, std::move(*mapped));
  }
  return out;
}

} // namespace torchser
