#pragma once

/// \file
/// `OrderedMap<V>`: a string-keyed map that keeps insertion order, the C++
/// counterpart of the Python dicts in torchser's results (shard plans,
/// index weight maps). It reads like `torch::OrderedDict` (items with
/// `key()` / `value()`, `keys()`, `operator[]`, `find`, `contains`) but
/// is built for maps of a million names: one allocation-free hash index over
/// a dense item array, and one hash per insert or lookup.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <torchser/errors.h>

namespace torchser {
namespace detail {

/// An open-addressing index (linear probing, load ≤ 1/2) over a dense array
/// of entries that the owner stores: the index keeps each entry's hash and
/// maps hashes to entry positions; the owner supplies key equality.
class FlatIndex {
 public:
  std::size_t size() const noexcept {
    return hashes_.size();
  }

  void reserve(std::size_t count) {
    hashes_.reserve(count);
    if (count * 2 > slots_.size()) {
      rebuild(count);
    }
  }

  void clear() noexcept {
    hashes_.clear();
    slots_.clear();
  }

  /// Position of the entry with `hash` for which `equals_at(position)` holds,
  /// or -1.
  template <typename EqualsAt>
  std::ptrdiff_t find(std::size_t hash, EqualsAt&& equals_at) const {
    if (slots_.empty()) {
      return -1;
    }
    const std::size_t mask = slots_.size() - 1;
    for (std::size_t s = hash & mask;; s = (s + 1) & mask) {
      const std::uint32_t slot = slots_[s];
      if (slot == 0) {
        return -1;
      }
      const std::size_t position = slot - 1;
      if (hashes_[position] == hash && equals_at(position)) {
        return static_cast<std::ptrdiff_t>(position);
      }
    }
  }

  /// Replaces the index with one over entries of the given hashes, which
  /// the caller knows belong to distinct keys. One pass with prefetching:
  /// slot writes for a million keys are cache misses that can overlap.
  void assign(std::vector<std::size_t> hashes) {
    if (hashes.size() > kMaxEntries) {
      throw ValueError(
          "torchser::OrderedMap cannot hold more than 2^32 - 2 entries.");
    }
    hashes_ = std::move(hashes);
    rebuild(hashes_.size());
  }

  /// Records a new entry (the next position) with `hash`. The caller has
  /// checked with find() that no equal entry exists.
  void append(std::size_t hash) {
    if (hashes_.size() >= kMaxEntries) {
      throw ValueError(
          "torchser::OrderedMap cannot hold more than 2^32 - 2 entries.");
    }
    hashes_.push_back(hash);
    if (hashes_.size() * 2 > slots_.size()) {
      rebuild(hashes_.size());
    } else {
      place(hashes_.size() - 1);
    }
  }

 private:
  static constexpr std::size_t kMaxEntries = 0xFFFFFFFEu;

  void rebuild(std::size_t count) {
    std::size_t capacity = 16;
    while (capacity < count * 2) {
      capacity *= 2;
    }
    slots_.assign(capacity, 0);
    constexpr std::size_t kAhead = 16;
    const std::size_t mask = capacity - 1;
    for (std::size_t position = 0; position < hashes_.size(); ++position) {
      if (position + kAhead < hashes_.size()) {
        __builtin_prefetch(&slots_[hashes_[position + kAhead] & mask], 1);
      }
      place(position);
    }
  }

  void place(std::size_t position) {
    const std::size_t mask = slots_.size() - 1;
    std::size_t s = hashes_[position] & mask;
    while (slots_[s] != 0) {
      s = (s + 1) & mask;
    }
    slots_[s] = static_cast<std::uint32_t>(position + 1);
  }

  std::vector<std::size_t> hashes_;  // per entry, for probing and rebuilds
  std::vector<std::uint32_t> slots_; // 0 = empty, else position + 1
};

} // namespace detail

/// A string → V map in insertion order.
///
/// Example:
/// ```
/// OrderedMap<std::string> owners;
/// owners.insert("lm_head.weight", "model-00002-of-00002.safetensors");
/// for (const auto& item : owners) { item.key(); item.value(); }
/// ```
template <typename V>
class OrderedMap {
 public:
  /// One entry: `key()` and `value()`, as `torch::OrderedDict::Item`.
  class Item {
   public:
    /// `key` → `value`.
    Item(std::string key, V value)
        : key_(std::move(key)), value_(std::move(value)) {}
    /// The key.
    const std::string& key() const noexcept {
      return key_;
    }
    /// The value.
    ///@{
    V& value() noexcept {
      return value_;
    }
    const V& value() const noexcept {
      return value_;
    }
    ///@}

   private:
    std::string key_;
    V value_;
  };

  /// Iterators over the entries, in insertion order.
  ///@{
  using iterator = typename std::vector<Item>::iterator;
  using const_iterator = typename std::vector<Item>::const_iterator;
  ///@}

  OrderedMap() = default;
  /// `Metadata{{"epoch", "3"}, {"lr", "0.1"}}`: the pairs in order (a
  /// duplicate key is a ValueError, as for insert()).
  OrderedMap(std::initializer_list<std::pair<std::string, V>> items) {
    for (const auto& [key, value] : items) {
      insert(key, value);
    }
  }

  /// Inserts `key` → `value` at the end. Throws ValueError when the key is
  /// already present (a Python dict would overwrite; torchser never builds a
  /// map where that could be intended).
  V& insert(std::string key, V value) {
    const std::size_t hash = hash_of(key);
    if (find_position(key, hash) >= 0) {
      throw ValueError("Duplicate key '" + key + "'.");
    }
    items_.emplace_back(std::move(key), std::move(value));
    index_.append(hash);
    return items_.back().value();
  }

  /// Inserts `key` → `value` unless the key is present. Returns the value in
  /// the map and whether it was inserted (std::map::try_emplace's contract).
  std::pair<V*, bool> try_insert(std::string key, V value) {
    const std::size_t hash = hash_of(key);
    const std::ptrdiff_t found = find_position(key, hash);
    if (found >= 0) {
      return {&items_[static_cast<std::size_t>(found)].value(), false};
    }
    items_.emplace_back(std::move(key), std::move(value));
    index_.append(hash);
    return {&items_.back().value(), true};
  }

  /// A map of `items`, whose keys the caller knows to be distinct (the keys
  /// of another map, say): no duplicate check, and the index is built in one
  /// pass. A duplicate key here would make lookups find only its first entry.
  static OrderedMap from_unique_items(std::vector<Item> items) {
    std::vector<std::size_t> hashes;
    hashes.reserve(items.size());
    for (const Item& item : items) {
      hashes.push_back(hash_of(item.key()));
    }
    return from_unique_items(std::move(items), std::move(hashes));
  }
  /// The same, with `hashes[i] == OrderedMap::hash_of(items[i].key())`
  /// computed by the caller while the keys were still in cache.
  static OrderedMap from_unique_items(
      std::vector<Item> items, std::vector<std::size_t> hashes) {
    if (hashes.size() != items.size()) {
      throw ValueError(
          "OrderedMap::from_unique_items: one hash per item is required.");
    }
    OrderedMap map;
    map.items_ = std::move(items);
    map.index_.assign(std::move(hashes));
    return map;
  }

  /// The hash this map uses for `key`.
  static std::size_t hash_of(std::string_view key) noexcept {
    return std::hash<std::string_view>{}(key);
  }

  /// The value of `key`, or nullptr.
  ///@{
  V* find(std::string_view key) noexcept {
    const std::ptrdiff_t p = find_position(key, hash_of(key));
    return p < 0 ? nullptr : &items_[static_cast<std::size_t>(p)].value();
  }
  const V* find(std::string_view key) const noexcept {
    const std::ptrdiff_t p = find_position(key, hash_of(key));
    return p < 0 ? nullptr : &items_[static_cast<std::size_t>(p)].value();
  }
  ///@}
  /// Whether `key` is present.
  bool contains(std::string_view key) const noexcept {
    return find(key) != nullptr;
  }

  /// The value of `key`; throws KeyError (Python's `dict[key]`) when absent.
  ///@{
  V& operator[](std::string_view key) {
    V* value = find(key);
    if (value == nullptr) {
      throw KeyError("'" + std::string(key) + "'");
    }
    return *value;
  }
  const V& operator[](std::string_view key) const {
    const V* value = find(key);
    if (value == nullptr) {
      throw KeyError("'" + std::string(key) + "'");
    }
    return *value;
  }
  ///@}

  /// The number of entries.
  std::size_t size() const noexcept {
    return items_.size();
  }
  /// Whether there are none.
  bool empty() const noexcept {
    return items_.empty();
  }
  /// Makes room for `count` entries.
  void reserve(std::size_t count) {
    items_.reserve(count);
    index_.reserve(count);
  }
  /// Removes every entry.
  void clear() noexcept {
    items_.clear();
    index_.clear();
  }

  /// The entries, in insertion order.
  ///@{
  iterator begin() noexcept {
    return items_.begin();
  }
  iterator end() noexcept {
    return items_.end();
  }
  const_iterator begin() const noexcept {
    return items_.begin();
  }
  const_iterator end() const noexcept {
    return items_.end();
  }
  ///@}
  /// The entries, in insertion order.
  const std::vector<Item>& items() const noexcept {
    return items_;
  }
  /// The keys, in insertion order.
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    out.reserve(items_.size());
    for (const Item& item : items_) {
      out.push_back(item.key());
    }
    return out;
  }
  /// The values, in insertion order.
  std::vector<V> values() const {
    std::vector<V> out;
    out.reserve(items_.size());
    for (const Item& item : items_) {
      out.push_back(item.value());
    }
    return out;
  }

 private:
  std::ptrdiff_t find_position(
      std::string_view key, std::size_t hash) const noexcept {
    return index_.find(
        hash, [&](std::size_t p) { return items_[p].key() == key; });
  }

  std::vector<Item> items_;
  detail::FlatIndex index_;
};

} // namespace torchser
