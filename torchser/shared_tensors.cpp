#include "torchser/detail/shared_tensors.h"

#include <algorithm>
#include <set>
#include <tuple>
#include <unordered_map>

#include <torchser/errors.h>
#include <torchser/shared_tensors.h>
#include <torchser/storage.h>

#include "torchser/detail/python_format.h"

namespace torchser {
namespace {

// ---------------------------------------------------------------------------
// Shared tensors (safetensors' _find_shared_tensors / _remove_duplicate_names)

struct Area {
  std::uintptr_t start;
  std::uintptr_t stop;
  std::string name;
};

// One past the last byte any element of `t` occupies. From sizes and strides
// rather than view(-1), so transposed aliases do not throw (the reference
// flattens, which fails on them).
std::uintptr_t end_address(const at::Tensor& t) {
  const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  if (t.numel() == 0) {
    return start;
  }
  std::int64_t last = 0;
  for (std::int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return start + static_cast<std::uintptr_t>(
                     (last + 1) * static_cast<std::int64_t>(t.element_size()));
}

bool is_complete(const at::Tensor& t) {
  const StorageId id = *get_torch_storage_id(t);
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) == id.data_ptr &&
         t.numel() * static_cast<std::int64_t>(t.element_size()) == id.nbytes;
}

std::string python_set_repr(std::vector<std::string> names) {
  std::sort(names.begin(), names.end());
  std::string out = "{";
  for (std::size_t i = 0; i < names.size(); ++i) {
    out += (i == 0 ? "" : ", ") + detail::python_repr(names[i]);
  }
  return out + "}";
}

} // namespace

OrderedMap<std::vector<std::string>> remove_duplicate_names(
    const StateDict& state_dict,
    const std::vector<std::string>& discard_names) {
  // Groups by storage, first appearance first; empty and meta tensors never
  // share.
  std::vector<std::vector<std::string>> groups;
  std::unordered_map<StorageId, std::size_t> group_of;
  for (const auto& item : state_dict) {
    const auto id = get_torch_storage_id(item.value());
    if (!id.has_value() || id->data_ptr == 0 || id->nbytes == 0) {
      continue;
    }
    const auto [it, inserted] = group_of.try_emplace(*id, groups.size());
    if (inserted) {
      groups.emplace_back();
    }
    groups[it->second].push_back(item.key());
  }
  const std::set<std::string> discard(
      discard_names.begin(), discard_names.end());
  OrderedMap<std::vector<std::string>> result;
  for (const auto& group : groups) {
    // Split a storage's names into runs of overlapping byte ranges.
    std::vector<std::vector<std::string>> subgroups;
    if (group.size() == 1) {
      subgroups.push_back(group);
    } else {
      std::vector<Area> areas;
      for (const std::string& name : group) {
        const at::Tensor& t = state_dict[name];
        areas.push_back(
            {reinterpret_cast<std::uintptr_t>(t.data_ptr()),
             end_address(t),
             name});
      }
      std::sort(areas.begin(), areas.end(), [](const Area& a, const Area& b) {
        return std::tie(a.start, a.stop, a.name) <
               std::tie(b.start, b.stop, b.name);
      });
      std::uintptr_t last_stop = 0;
      for (const Area& area : areas) {
        if (subgroups.empty() || area.start >= last_stop) {
          subgroups.emplace_back();
          last_stop = area.stop;
        }
        subgroups.back().push_back(area.name);
        last_stop = std::max(
            last_stop, area.stop); // the reference keeps only the last stop
      }
    }
    for (auto& names : subgroups) {
      std::vector<std::string> complete;
      for (const std::string& name : names) {
        if (is_complete(state_dict[name])) {
          complete.push_back(name);
        }
      }
      if (complete.empty()) {
        throw RuntimeError(
            "Error while trying to find names to remove to save state dict, "
            "but found no suitable name to keep for "
            "saving amongst: " +
            python_set_repr(names) +
            ". None is covering the entire storage. Refusing to save/load the "
            "model since you could be storing much "
            "more memory than needed. Please refer to "
            "https://huggingface.co/docs/safetensors/torch_shared_tensors "
            "for more information. Or open an issue.");
      }
      std::sort(complete.begin(), complete.end());
      std::string keep = complete.front();
      for (const std::string& name : complete) {
        if (discard.count(name) == 0) {
          keep = name;
          break;
        }
      }
      std::sort(names.begin(), names.end());
      std::vector<std::string> dropped;
      for (const std::string& name : names) {
        if (name != keep) {
          dropped.push_back(name);
        }
      }
      if (!dropped.empty()) {
        result.insert(keep, std::move(dropped));
      }
    }
  }
  return result;
}

namespace detail {

DroppedAliases drop_aliases(
    const StateDict& state_dict, const std::vector<std::string>& discard) {
  DroppedAliases out;
  std::set<std::string> removed;
  for (const auto& item : remove_duplicate_names(state_dict, discard)) {
    for (const std::string& name : item.value()) {
      removed.insert(name);
      out.aliases.emplace_back(name, item.key());
    }
  }
  out.kept.reserve(state_dict.size() - removed.size());
  for (const auto& item : state_dict) {
    if (removed.count(item.key()) == 0) {
      out.kept.insert(item.key(), item.value());
    }
  }
  return out;
}

std::size_t retie_aliases(
    StateDict& state_dict,
    const std::vector<std::pair<std::string, std::string>>& metadata) {
  std::size_t retied = 0;
  for (const auto& [alias, kept] : metadata) {
    const at::Tensor* value = state_dict.find(kept);
    if (value != nullptr && !state_dict.contains(alias)) {
      state_dict.insert(alias, *value);
      ++retied;
    }
  }
  return retied;
}

} // namespace detail
} // namespace torchser
