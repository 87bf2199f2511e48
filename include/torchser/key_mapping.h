#pragma once

/// \file
/// Renaming tensors between a checkpoint's names and a module's: the most
/// common reason a load "does nothing" is a prefix (`module.` from
/// DataParallel, `model.` from a wrapper) or a renamed layer. The same
/// mapping serves loading (checkpoint name → module name, LoadOptions) and
/// saving (module name → written name, SaveOptions).

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <torch/arg.h>

#include <torchser/export.h>

namespace torchser {

/// The steps, applied in this order to every name:
/// 1. `strip_prefix`: removed where the name starts with it (names without it
///    pass unchanged);
/// 2. `renames`: each (pattern, replacement) in turn, on the result of the
///    previous one, replacing every match as Python's `re.sub` does
///    (transformers v5's weight renamings chain the same way). Patterns are
///    ECMAScript regular expressions (std::regex); replacements take
///    Python's group references (`\1`, `\g<1>`) as well as `$1`;
/// 3. `add_prefix`: prepended to every name;
/// 4. `rename_with`: a callback with the last word: the new name, or
///    std::nullopt to drop the tensor.
/// Two names that end up as one are an error naming both (ValueError).
struct TORCHSER_API KeyMapping {
  /// (pattern, replacement) pairs.
  using Renames = std::vector<std::pair<std::string, std::string>>;
  /// A callback's answer: the new name, or std::nullopt to drop the tensor.
  using RenameFunction =
      std::function<std::optional<std::string>(const std::string&)>;
  /// Step 1: removed where a name starts with it. Default: none.
  TORCH_ARG(std::string, strip_prefix) = "";
  /// Step 2: regex renamings, applied in order. Default: none.
  TORCH_ARG(Renames, renames) = {};
  /// Step 3: prepended to every name. Default: none.
  TORCH_ARG(std::string, add_prefix) = "";
  /// Step 4: the last word on each name (std::nullopt drops it). Default:
  /// none.
  TORCH_ARG(RenameFunction, rename_with);

 public: // TORCH_ARG leaves the struct in private:
  /// Appends one regex renaming (step 2).
  KeyMapping& rename(std::string pattern, std::string replacement) {
    renames_.emplace_back(std::move(pattern), std::move(replacement));
    return *this;
  }
  /// Whether every name maps to itself.
  bool empty() const {
    return strip_prefix_.empty() && renames_.empty() && add_prefix_.empty() &&
           !rename_with_;
  }
  /// The mapping of the other direction, for prefix mappings: a load's
  /// strip_prefix("module.") is a save's add_prefix("module."). ValueError
  /// for regex renames and callbacks, which have no general inverse.
  KeyMapping inverse() const;
};

/// Applies `mapping` to one name: the new name, or std::nullopt when the
/// callback drops it. ValueError for a pattern std::regex rejects.
TORCHSER_API std::optional<std::string> map_key(
    const std::string& key, const KeyMapping& mapping);

/// (old name, new name) for every one of `keys` that is kept, in the order of
/// `keys`. ValueError when two keys map to one name, naming both and
/// `where` (the file or "the state dict").
TORCHSER_API std::vector<std::pair<std::string, std::string>> map_keys(
    const std::vector<std::string>& keys,
    const KeyMapping& mapping,
    const std::string& where);

} // namespace torchser
