#include <torchser/split.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include <torchser/errors.h>
#include <torchser/storage.h>

#include "torchser/detail/python_format.h"
#include "torchser/detail/tensor_check.h"

namespace torchser {
namespace {

// Python's float() grammar, without the Unicode digits:
//   [sign] (digitpart ["." [digitpart]] | "." digitpart) [exponent]
//   [sign] ("inf" | "infinity" | "nan"), case-insensitive
// where digitpart = digit (["_"] digit)*. Returns false where float() raises.
bool parse_python_float(std::string_view text, double& out) {
  std::size_t i = 0;
  bool negative = false;
  if (i < text.size() && (text[i] == '+' || text[i] == '-')) {
    negative = text[i] == '-';
    ++i;
  }
  const auto lower_equals = [](std::string_view a, std::string_view word) {
    if (a.size() != word.size()) {
      return false;
    }
    for (std::size_t k = 0; k < a.size(); ++k) {
      const char c = a[k];
      if ((c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c) != word[k]) {
        return false;
      }
    }
    return true;
  };
  const std::string_view rest = text.substr(i);
  if (lower_equals(rest, "inf") || lower_equals(rest, "infinity")) {
    out = negative ? -std::numeric_limits<double>::infinity()
                   : std::numeric_limits<double>::infinity();
    return true;
  }
  if (lower_equals(rest, "nan")) {
    out = std::numeric_limits<double>::quiet_NaN();
    return true;
  }

  std::string clean; // without underscores or sign, for from_chars
  const auto is_digit = [&](std::size_t k) {
    return k < text.size() && text[k] >= '0' && text[k] <= '9';
  };
  // Reads digit (["_"] digit)*; returns the number of digits read.
  const auto read_digitpart = [&]() -> std::size_t {
    std::size_t digits = 0;
    while (is_digit(i)) {
      clean += text[i++];
      ++digits;
      if (i + 1 < text.size() && text[i] == '_' && is_digit(i + 1)) {
        ++i;
      }
    }
    return digits;
  };
  const std::size_t int_digits = read_digitpart();
  std::size_t frac_digits = 0;
  if (i < text.size() && text[i] == '.') {
    clean += text[i++];
    frac_digits = read_digitpart();
  }
  if (int_digits + frac_digits == 0) {
    return false;
  }
  long exponent = 0;
  if (i < text.size() && (text[i] == 'e' || text[i] == 'E')) {
    clean += text[i++];
    const std::size_t exponent_start = clean.size();
    if (i < text.size() && (text[i] == '+' || text[i] == '-')) {
      clean += text[i++];
    }
    if (read_digitpart() == 0) {
      return false;
    }
    // Only the sign and rough magnitude matter (for out-of-range results).
    const std::string_view exp_text =
        std::string_view(clean).substr(exponent_start);
    exponent = exp_text.size() > 7 ? (exp_text[0] == '-' ? -9999999 : 9999999)
                                   : std::stol(std::string(exp_text));
  }
  if (i != text.size()) {
    return false;
  }

  double value = 0.0;
  const auto [end, error] =
      std::from_chars(clean.data(), clean.data() + clean.size(), value);
  if (error == std::errc::result_out_of_range) {
    // float() gives inf on overflow and 0.0 on underflow. The decimal order
    // of magnitude tells which: position of the first nonzero digit.
    const std::size_t dot = clean.find('.');
    const std::string_view mantissa = std::string_view(clean).substr(
        0, std::min(clean.find_first_of("eE"), clean.size()));
    const std::size_t first = mantissa.find_first_not_of("0.");
    long order = 0;
    if (first != std::string_view::npos) {
      const std::size_t point =
          dot == std::string::npos ? mantissa.size() : dot;
      order = first < point ? static_cast<long>(point - first) - 1
                            : -static_cast<long>(first - point);
    }
    value =
        order + exponent > 0 ? std::numeric_limits<double>::infinity() : 0.0;
  } else if (error != std::errc() || end != clean.data() + clean.size()) {
    return false;
  }
  out = negative ? -value : value;
  return true;
}

std::string shard_suffix(std::size_t index, std::size_t count) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "-%05zu-of-%05zu", index + 1, count);
  return buffer;
}

} // namespace

std::int64_t parse_size_to_int(std::string_view size_as_str) {
  const std::string_view s = detail::python_strip(size_as_str);
  // s[-2:] and s[:-2] count code points, not bytes.
  std::size_t unit_start = s.size();
  for (int points = 0; points < 2 && unit_start > 0; ++points) {
    --unit_start;
    while (unit_start > 0 &&
           (static_cast<unsigned char>(s[unit_start]) & 0xC0) == 0x80) {
      --unit_start;
    }
  }
  std::string unit(s.substr(unit_start));
  for (char& c : unit) {
    if (c >= 'a' && c <= 'z') {
      c = static_cast<char>(c - 'a' + 'A');
    }
  }
  std::int64_t multiplier = 0;
  if (unit == "TB") {
    multiplier = 1'000'000'000'000;
  } else if (unit == "GB") {
    multiplier = 1'000'000'000;
  } else if (unit == "MB") {
    multiplier = 1'000'000;
  } else if (unit == "KB") {
    multiplier = 1'000;
  } else {
    throw ValueError(
        "Unit '" + unit +
        "' not supported. Supported units are TB, GB, MB, KB. Got '" +
        std::string(s) + "'.");
  }

  const std::string_view number = detail::python_strip(s.substr(0, unit_start));
  double value = 0.0;
  if (!parse_python_float(number, value)) {
    throw ValueError(
        "Could not parse the size value from '" + std::string(s) +
        "': could not convert string to float: " + detail::python_repr(number));
  }
  const double bytes = value * static_cast<double>(multiplier);
  // Python raises OverflowError / ValueError from int() here, with these
  // texts; torchser adds the size that caused them.
  if (std::isnan(bytes)) {
    throw ValueError(
        "cannot convert float NaN to integer (size '" + std::string(s) + "')");
  }
  if (std::isinf(bytes)) {
    throw ValueError(
        "cannot convert float infinity to integer (size '" + std::string(s) +
        "')");
  }
  // 2^63 is exact in a double; anything at or past it does not fit.
  constexpr double kLimit = 9223372036854775808.0;
  if (bytes >= kLimit || bytes < -kLimit) {
    throw ValueError(
        "Size '" + std::string(s) +
        "' is too large: it does not fit in a 64-bit byte count.");
  }
  return static_cast<std::int64_t>(bytes); // truncates toward zero, as int()
}

std::int64_t ShardSize::from_signed(std::int64_t bytes) {
  if (bytes <= 0) {
    throw ValueError(
        "max_shard_size must be a positive number of bytes, got " +
        std::to_string(bytes) + ".");
  }
  return bytes;
}

std::int64_t ShardSize::from_unsigned(std::uint64_t bytes) {
  if (bytes >
      static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    throw ValueError(
        "max_shard_size " + std::to_string(bytes) +
        " does not fit in a 64-bit signed byte count.");
  }
  return from_signed(static_cast<std::int64_t>(bytes));
}

std::int64_t ShardSize::from_string(std::string_view size) {
  const std::int64_t bytes = parse_size_to_int(size);
  if (bytes <= 0) {
    throw ValueError(
        "max_shard_size must be a positive number of bytes, got " +
        std::to_string(bytes) + " from '" + std::string(size) + "'.");
  }
  return bytes;
}

ShardSize::ShardSize(const char* size)
    : bytes_(from_string(size == nullptr ? std::string_view() : size)) {}
ShardSize::ShardSize(const std::string& size) : bytes_(from_string(size)) {}
ShardSize::ShardSize(std::string_view size) : bytes_(from_string(size)) {}

namespace detail {

StateDictSplit plan_shards(
    const std::vector<PlanEntry>& entries,
    std::size_t group_count,
    bool keys_unique,
    const SplitOptions& options) {
  const FilenamePattern pattern(options.filename_pattern());
  const std::int64_t max = options.max_shard_size().bytes();
  const std::size_t n = entries.size();

  // Shards hold entry indices. An entry's shard is known only once its shard
  // is closed (oversize tensors are appended ahead of the open one).
  std::vector<std::vector<std::size_t>> shards;
  std::vector<std::size_t> current;
  std::int64_t current_size = 0;
  std::int64_t total_size = 0;
  std::vector<std::size_t> group_first_entry(group_count);
  std::vector<std::size_t> shard_of_entry(n);
  std::vector<std::size_t> aliases; // entry indices, in state-dict order

  const auto close_shard = [&](std::vector<std::size_t>&& shard) {
    for (const std::size_t e : shard) {
      shard_of_entry[e] = shards.size();
    }
    shards.push_back(std::move(shard));
  };

  for (std::size_t e = 0; e < n; ++e) {
    const PlanEntry& entry = entries[e];
    if (entry.role == PlanRole::kSkipped) {
      continue;
    }
    if (entry.role == PlanRole::kAlias) {
      aliases.push_back(e);
      continue;
    }
    if (entry.group >= 0) {
      group_first_entry[static_cast<std::size_t>(entry.group)] = e;
    }
    const std::int64_t size = entry.size;
    if (size < 0) {
      throw ValueError(
          "Storage size of '" + std::string(entry.key) + "' is negative (" +
          std::to_string(size) + " bytes).");
    }
    if (__builtin_add_overflow(total_size, size, &total_size)) {
      throw ValueError(
          "The total size of the state dict overflows 64 bits at '" +
          std::string(entry.key) + "'.");
    }
    if (size > max) {
      close_shard({e});
      continue;
    }
    // current_size <= max here, so max - current_size cannot overflow.
    if (size > max - current_size) {
      close_shard(std::move(current));
      current.clear();
      current_size = 0;
    }
    current.push_back(e);
    current_size += size;
  }
  if (!current.empty()) {
    close_shard(std::move(current));
  }

  if (shards.empty()) {
    throw ValueError(
        n == 0 ? "Cannot split an empty state dict: there is no tensor to save."
               : "Cannot split the state dict: none of its " +
                     std::to_string(n) + " entries is a tensor.");
  }
  const std::size_t shard_count = shards.size();
  if (shard_count > 1 && !pattern.has_suffix()) {
    // The reference gives every shard the same name and keeps only the last
    // one (huggingface_hub.md §3.A-6); that loses data, so refuse.
    throw ValueError(
        "filename_pattern '" + pattern.pattern() +
        "' has no '{suffix}' placeholder, but the state dict needs " +
        std::to_string(shard_count) +
        " shards: every shard would get the same file name. Add '{suffix}' "
        "to the pattern or raise max_shard_size.");
  }

  // Aliases join the shard of their storage's first key, storage by storage
  // in first-seen order (Python walks storage_id_to_tensors). A stable
  // counting sort by group gives that order in O(n).
  if (!aliases.empty()) {
    std::vector<std::size_t> start(group_count + 1, 0);
    for (const std::size_t e : aliases) {
      ++start[static_cast<std::size_t>(entries[e].group) + 1];
    }
    for (std::size_t g = 0; g < group_count; ++g) {
      start[g + 1] += start[g];
    }
    std::vector<std::size_t> by_group(aliases.size());
    std::vector<std::size_t> fill(start.begin(), start.end() - 1);
    for (const std::size_t e : aliases) {
      by_group[fill[static_cast<std::size_t>(entries[e].group)]++] = e;
    }
    for (const std::size_t e : by_group) {
      const auto group = static_cast<std::size_t>(entries[e].group);
      shards[shard_of_entry[group_first_entry[group]]].push_back(e);
    }
  }

  StateDictSplit split;
  split.metadata.total_size = total_size;
  split.is_sharded = shard_count > 1;
  split.filename_to_tensors.reserve(shard_count);
  // Keys from a container with unique keys go in without a duplicate check,
  // and their index is built once at the end.
  std::vector<OrderedMap<std::string>::Item> owners;
  std::vector<std::size_t> owner_hashes;
  if (keys_unique) {
    owners.reserve(n);
    owner_hashes.reserve(n);
  } else {
    split.tensor_to_filename.reserve(n);
  }
  for (std::size_t s = 0; s < shard_count; ++s) {
    std::string filename =
        pattern.format(shard_count == 1 ? "" : shard_suffix(s, shard_count));
    std::vector<std::string> names;
    names.reserve(shards[s].size());
    for (const std::size_t e : shards[s]) {
      names.emplace_back(entries[e].key);
      if (keys_unique) {
        owner_hashes.push_back(OrderedMap<std::string>::hash_of(names.back()));
        owners.emplace_back(names.back(), filename);
        continue;
      }
      try {
        split.tensor_to_filename.insert(names.back(), filename);
      } catch (const ValueError&) {
        throw ValueError(
            "Duplicate tensor name '" + names.back() +
            "' in the state dict: every name must be unique.");
      }
    }
    split.filename_to_tensors.insert(std::move(filename), std::move(names));
  }
  if (keys_unique) {
    split.tensor_to_filename = OrderedMap<std::string>::from_unique_items(
        std::move(owners), std::move(owner_hashes));
  }
  return split;
}

} // namespace detail

StateDictSplit split_torch_state_dict_into_shards(
    const StateDict& state_dict, const SplitOptions& options) {
  try {
    return split_state_dict_into_shards_factory(
        state_dict,
        [](const at::Tensor& t) { return get_torch_storage_size(t); },
        [](const at::Tensor& t) { return get_torch_storage_id(t); },
        options);
  } catch (const ValueError&) {
    // The storage functions do not know the key of a bad tensor; find it here
    // rather than checking every tensor up front (a second pass over a
    // million TensorImpls costs more than the planning itself).
    for (const auto& item : state_dict) {
      detail::check_tensor_has_storage(
          item.value(), "Tensor '" + item.key() + "'");
    }
    throw;
  }
}

} // namespace torchser
