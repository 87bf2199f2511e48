#pragma once

/// \file
/// Shard planning: which tensors go into which file, exactly as
/// `huggingface_hub.split_torch_state_dict_into_shards` decides
/// (`huggingface_hub/serialization/_base.py` and `_torch.py`).
///
/// The plan is greedy in key order:
/// 1. Entries whose storage was already seen (tied weights, views) are not
///    sized; they join the shard of the first key of their storage at the end.
/// 2. A tensor larger than max_shard_size gets a shard of its own, appended
///    immediately (ahead of the shard being filled).
/// 3. Otherwise, a tensor that would push the current shard past
///    max_shard_size closes it and starts the next one.
/// 4. One shard is named by the pattern with an empty suffix; several are
///    named with `-00001-of-00003` style suffixes, 1-based, 5-digit minimum.
///
/// The result is identical to the reference's for every input it accepts, but
/// computed in O(n) (the reference is quadratic in the number of storages).
/// Deliberate differences, all stricter: an empty state dict, an undefined
/// tensor, a non-positive max_shard_size, and a pattern without `{suffix}`
/// that needs several shards are ValueErrors; patterns support `{suffix}`,
/// `{{` and `}}` only.

#include <cstdint>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <c10/util/Exception.h> // torch/ordered_dict.h uses TORCH_CHECK
#include <torch/arg.h>
#include <torch/ordered_dict.h>

#include <torchser/constants.h>
#include <torchser/export.h>
#include <torchser/ordered_map.h>
#include <torchser/state_dict.h>

namespace torchser {

/// `parse_size_to_int`: parses a size such as "5GB", " 10 KB " or "1.5gb"
/// into bytes. Units are decimal (TB = 10^12, GB, MB, KB = 10^3), case
/// insensitive; the number is anything Python's float() accepts ("1e3",
/// "1_000", "+5"); the product is truncated toward zero, so "0.0000001KB" is 0
/// and "-1KB" is -1000, as in Python.
///
/// Throws ValueError with the reference's messages:
/// `Unit '{unit}' not supported. Supported units are TB, GB, MB, KB. Got
/// '{s}'.` and `Could not parse the size value from '{s}': could not convert
/// string to float: '{number}'`; also for "inf"/"nan" and sizes beyond int64.
TORCHSER_API std::int64_t parse_size_to_int(std::string_view size_as_str);

/// A maximum shard size: a byte count or a size string (Python's `int | str`).
///
/// Strings are parsed on construction, so a bad one throws ValueError where
/// the options are built. Zero and negative sizes are rejected with
/// ValueError (the reference accepts them and puts every tensor in a shard of
/// its own; torchser treats them as the mistake they are).
///
/// Example:
/// ```
/// ShardSize a = 500'000'000;
/// ShardSize b = "500MB";
/// assert(a == b);
/// ```
class TORCHSER_API ShardSize {
 public:
  /// From a byte count. A template, so that the literal `0` is not ambiguous
  /// with `const char*`.
  template <
      typename Integer,
      std::enable_if_t<std::is_integral_v<Integer>, int> = 0>
  ShardSize(Integer bytes) // NOLINT(google-explicit-constructor)
      : bytes_(
            std::is_signed_v<Integer>
                ? from_signed(static_cast<std::int64_t>(bytes))
                : from_unsigned(static_cast<std::uint64_t>(bytes))) {
    static_assert(!std::is_same_v<Integer, bool>, "a size is not a bool");
  }
  /// From a size string such as "5GB" (see parse_size_to_int()).
  ///@{
  ShardSize(const char* size);        // NOLINT(google-explicit-constructor)
  ShardSize(const std::string& size); // NOLINT(google-explicit-constructor)
  ShardSize(std::string_view size);   // NOLINT(google-explicit-constructor)
  ///@}

  /// The size in bytes; always positive.
  std::int64_t bytes() const noexcept {
    return bytes_;
  }
  /// Sizes compare by their bytes.
  ///@{
  friend bool operator==(ShardSize a, ShardSize b) noexcept {
    return a.bytes_ == b.bytes_;
  }
  friend bool operator!=(ShardSize a, ShardSize b) noexcept {
    return a.bytes_ != b.bytes_;
  }
  ///@}

 private:
  static std::int64_t from_signed(std::int64_t bytes);
  static std::int64_t from_unsigned(std::uint64_t bytes);
  static std::int64_t from_string(std::string_view size);
  std::int64_t bytes_;
};

/// `StateDictSplit.metadata`, which the reference always sets to
/// `{"total_size": N}`.
struct TORCHSER_API SplitMetadata {
  /// Bytes of all distinct storages in the plan, each counted once.
  std::int64_t total_size = 0;
};

/// `huggingface_hub.StateDictSplit`: the result of shard planning.
struct TORCHSER_API StateDictSplit {
  /// `{"total_size": ...}`.
  SplitMetadata metadata;
  /// File name → tensor names, in shard order, names in placement order.
  OrderedMap<std::vector<std::string>> filename_to_tensors;
  /// Tensor name → file name, in shard order then placement order (not
  /// sorted, as in Python).
  OrderedMap<std::string> tensor_to_filename;
  /// Whether there is more than one file (`len(filename_to_tensors) > 1`).
  bool is_sharded = false;
};

/// Options of the shard planners: the keyword arguments of
/// `split_torch_state_dict_into_shards`, with the Python defaults.
struct TORCHSER_API SplitOptions {
  /// File-name pattern; `{suffix}` becomes "" for a single shard and
  /// "-00001-of-00003" style suffixes otherwise. A pattern without `{suffix}`
  /// is accepted only while it yields one shard.
  TORCH_ARG(std::string, filename_pattern) = kSafetensorsWeightsFilePattern;
  /// Largest shard, in bytes or as a size string. Default: "5GB".
  TORCH_ARG(ShardSize, max_shard_size) = kMaxShardSize;
};

/// `split_torch_state_dict_into_shards`: plans how to split `state_dict` into
/// shards of at most `max_shard_size` bytes, by storage (views and tied
/// weights count once and stay together).
///
/// Throws ValueError for an empty state dict, an undefined tensor, a tensor
/// without storage (sparse), an invalid pattern, and a pattern without
/// `{suffix}` that yields several shards.
///
/// Example:
/// ```
/// auto split = split_torch_state_dict_into_shards(
///     state_dict, SplitOptions().max_shard_size("2GB"));
/// for (const auto& shard : split.filename_to_tensors) {
///   // shard.key(): "model-00001-of-00002.safetensors"; shard.value(): names
/// }
/// ```
TORCHSER_API StateDictSplit split_torch_state_dict_into_shards(
    const StateDict& state_dict, const SplitOptions& options = {});

/// A storage-id callable for split_state_dict_into_shards_factory() that
/// treats every entry as independent (Python's `lambda t: None`).
struct NoStorageId {
  /// No storage, whatever the value.
  template <typename T>
  std::optional<int> operator()(const T& /*unused*/) const noexcept {
    return std::nullopt;
  }
};

namespace detail {

/// How one state-dict entry takes part in planning.
enum class PlanRole : std::uint8_t {
  kSized,   ///< Sized and placed greedily.
  kAlias,   ///< Shares a storage seen before: joins that storage's shard.
  kSkipped, ///< Not a tensor (the size callable returned nullopt).
};

struct PlanEntry {
  std::string_view key;
  std::int64_t size;  ///< Meaningful for kSized only.
  std::int64_t group; ///< Dense storage index in first-seen order, or -1.
  PlanRole role;
};

/// The planner proper, shared by every instantiation of the factory.
/// `keys_unique`: the container guarantees unique keys, so the duplicate
/// check can be skipped.
TORCHSER_API StateDictSplit plan_shards(
    const std::vector<PlanEntry>& entries,
    std::size_t group_count,
    bool keys_unique,
    const SplitOptions& options);

/// Containers whose keys are unique by construction.
template <typename Container>
struct HasUniqueKeys : std::false_type {};
template <typename V>
struct HasUniqueKeys<torch::OrderedDict<std::string, V>> : std::true_type {};
template <typename V>
struct HasUniqueKeys<OrderedMap<V>> : std::true_type {};
template <typename K, typename V, typename C, typename A>
struct HasUniqueKeys<std::map<K, V, C, A>> : std::true_type {};
template <typename K, typename V, typename H, typename E, typename A>
struct HasUniqueKeys<std::unordered_map<K, V, H, E, A>> : std::true_type {};

template <typename Item, typename = void>
struct HasKeyMethod : std::false_type {};
template <typename Item>
struct HasKeyMethod<Item, std::void_t<decltype(std::declval<Item>().key())>>
    : std::true_type {};

// torch::OrderedDict items expose key()/value(); pair-like items first/second.
template <typename Item>
const auto& item_key(const Item& item) {
  if constexpr (HasKeyMethod<Item>::value) {
    return item.key();
  } else {
    return item.first;
  }
}
template <typename Item>
const auto& item_value(const Item& item) {
  if constexpr (HasKeyMethod<Item>::value) {
    return item.value();
  } else {
    return item.second;
  }
}

template <typename Container, typename = void>
struct HasSize : std::false_type {};
template <typename Container>
struct HasSize<
    Container,
    std::void_t<decltype(std::size(std::declval<const Container&>()))>>
    : std::true_type {};

/// Dense indices for storage ids in first-seen order (Python's
/// `storage_id_to_tensors` keys), without a node allocation per id.
template <typename Id>
class FirstSeenIndex {
 public:
  void reserve(std::size_t count) {
    ids_.reserve(count);
    index_.reserve(count);
  }
  std::size_t size() const noexcept {
    return ids_.size();
  }
  /// The dense index of `id`, and whether it was seen for the first time.
  std::pair<std::int64_t, bool> index_of(Id&& id) {
    const std::size_t hash = std::hash<Id>{}(id);
    const std::ptrdiff_t found =
        index_.find(hash, [&](std::size_t p) { return ids_[p] == id; });
    if (found >= 0) {
      return {static_cast<std::int64_t>(found), false};
    }
    ids_.push_back(std::move(id));
    index_.append(hash);
    return {static_cast<std::int64_t>(ids_.size() - 1), true};
  }

 private:
  std::vector<Id> ids_;
  FlatIndex index_;
};

/// Prefetch hints for the planner's single pass (no effect on results).
template <typename T>
void prefetch_value(const T& /*unused*/) {}
inline void prefetch_value(const at::Tensor& tensor) {
  __builtin_prefetch(tensor.unsafeGetTensorImpl());
}
template <typename Item>
void prefetch_item(const Item& item) {
  const auto& key = item_key(item);
  if constexpr (std::is_same_v<std::decay_t<decltype(key)>, std::string>) {
    __builtin_prefetch(key.data());
  }
  prefetch_value(item_value(item));
}

template <typename T>
struct IsOptional : std::false_type {};
template <typename T>
struct IsOptional<std::optional<T>> : std::true_type {};

} // namespace detail

/// `split_state_dict_into_shards_factory`: the planner over any tensor type
/// (the C++ analogue of both the generic factory and
/// `split_tf_state_dict_into_shards`).
///
/// - `state_dict`: any range of (name, value) items in order:
///   `torch::OrderedDict<std::string, T>`, `std::vector<std::pair<std::string,
///   T>>`, `std::map`, ...
/// - `get_storage_size(value)` → bytes, as an integer, or as
///   `std::optional<integer>` where `std::nullopt` marks an entry that is not a
///   tensor (Python skips bnb's string entries): it is left out of every shard
///   and of total_size.
/// - `get_storage_id(value)` → `std::optional<Id>` for any hashable,
///   equality-comparable `Id`; values with equal ids share a storage.
///   Default: NoStorageId (every entry independent).
///
/// Throws ValueError for an empty state dict (or one where every entry is
/// skipped), a negative size, duplicate names, an invalid pattern, and a
/// pattern without `{suffix}` that yields several shards.
///
/// Example:
/// ```
/// std::vector<std::pair<std::string, std::vector<int>>> sd = {
///     {"a", {6}}, {"b", {10}}};
/// auto split = split_state_dict_into_shards_factory(
///     sd,
///     [](const std::vector<int>& v) { return std::int64_t{v[0]}; },
///     NoStorageId{},
///     SplitOptions().filename_pattern("file{suffix}.dummy").max_shard_size(10));
/// ```
template <
    typename StateDictT,
    typename GetStorageSize,
    typename GetStorageId = NoStorageId>
StateDictSplit split_state_dict_into_shards_factory(
    const StateDictT& state_dict,
    GetStorageSize&& get_storage_size,
    GetStorageId&& get_storage_id = {},
    const SplitOptions& options = {}) {
  using Value =
      std::decay_t<decltype(detail::item_value(*std::begin(state_dict)))>;
  using IdResult =
      std::decay_t<std::invoke_result_t<GetStorageId&, const Value&>>;
  static_assert(
      detail::IsOptional<IdResult>::value,
      "get_storage_id must return std::optional<Id>");
  using Id = typename IdResult::value_type;
  using SizeResult =
      std::decay_t<std::invoke_result_t<GetStorageSize&, const Value&>>;

  std::vector<detail::PlanEntry> entries;
  if constexpr (detail::HasSize<StateDictT>::value) {
    entries.reserve(std::size(state_dict));
  }
  detail::FirstSeenIndex<Id> groups;
  groups.reserve(entries.capacity());

  // Planning reads every key's characters and every tensor's impl once,
  // scattered over the heap: for large state dicts those cache misses are
  // most of the cost, so touch them a few items ahead.
  constexpr std::size_t kPrefetchAhead = 8;
  const auto begin = std::begin(state_dict);
  const auto end = std::end(state_dict);
  auto ahead = begin;
  for (std::size_t k = 0; k < kPrefetchAhead && ahead != end; ++k) {
    ++ahead;
  }
  for (auto it = begin; it != end; ++it) {
    if (ahead != end) {
      detail::prefetch_item(*ahead);
      ++ahead;
    }
    const auto& item = *it;
    const auto& key = detail::item_key(item);
    const auto& value = detail::item_value(item);
    std::int64_t size = 0;
    // Python skips non-tensors before asking for an id; a size callable that
    // can say "not a tensor" is asked first for the same reason.
    if constexpr (detail::IsOptional<SizeResult>::value) {
      const auto maybe_size = get_storage_size(value);
      if (!maybe_size.has_value()) {
        entries.push_back({key, 0, -1, detail::PlanRole::kSkipped});
        continue;
      }
      size = static_cast<std::int64_t>(*maybe_size);
    }
    std::int64_t group = -1;
    if (auto id = get_storage_id(value); id.has_value()) {
      bool first_seen = false;
      std::tie(group, first_seen) = groups.index_of(std::move(*id));
      if (!first_seen) {
        entries.push_back({key, 0, group, detail::PlanRole::kAlias});
        continue;
      }
    }
    if constexpr (!detail::IsOptional<SizeResult>::value) {
      size = static_cast<std::int64_t>(get_storage_size(value));
    }
    entries.push_back({key, size, group, detail::PlanRole::kSized});
  }
  return detail::plan_shards(
      entries,
      groups.size(),
      detail::HasUniqueKeys<StateDictT>::value,
      options);
}

} // namespace torchser
