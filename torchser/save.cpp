#include <torchser/save.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

#include <torchser/module.h>
#include <torchser/safetensors.h>
#include <torchser/storage.h>

#include "torchser/detail/file.h"
#include "torchser/detail/directory_lock.h"
#include "torchser/detail/index_json.h"
#include "torchser/detail/pickle_writer.h"
#include "torchser/detail/python_format.h"

namespace torchser {
namespace {

constexpr const char* kJournalName = ".torchser-commit.json";

// ---------------------------------------------------------------------------
// Shared tensors (safetensors' _find_shared_tensors / _remove_duplicate_names)

struct Area {
  std::uintptr_t start;
  std::uintptr_t stop;
  std::string name;
};

// One past the last byte any element of `t` occupies. From sizes and strides
// rather than view(-1), so transposed aliases do not throw (SPEC deviation 8).
std::uintptr_t end_address(const at::Tensor& t) {
  const auto start = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  if (t.numel() == 0) {
    return start;
  }
  std::int64_t last = 0;
  for (std::int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return start + static_cast<std::uintptr_t>((last + 1) * static_cast<std::int64_t>(t.element_size()));
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

// ---------------------------------------------------------------------------
// Stale files: whole names of the pattern, the pattern never a regex.

bool is_shard_suffix(std::string_view s) {
  // "-ddddd-of-ddddd"
  if (s.size() != 15 || s[0] != '-' || s.substr(6, 4) != "-of-") {
    return false;
  }
  for (const std::size_t i : {1, 2, 3, 4, 5, 10, 11, 12, 13, 14}) {
    if (s[i] < '0' || s[i] > '9') {
      return false;
    }
  }
  return true;
}

bool matches_pattern(const detail::FilenamePattern& pattern, std::string name) {
  const std::string index_suffix = kIndexSuffix;
  if (name.size() > index_suffix.size() &&
      name.compare(name.size() - index_suffix.size(), std::string::npos, index_suffix) == 0) {
    name.resize(name.size() - index_suffix.size());
  }
  if (name == pattern.format("")) {
    return true;
  }
  if (!pattern.has_suffix()) {
    return false;
  }
  // The text before the first {suffix} is fixed; the 15 characters after it
  // must be a shard suffix, and the whole name the pattern with it.
  const std::string head = pattern.format("\x01");
  const std::size_t at = head.find('\x01');
  if (name.size() < at + 15 || name.compare(0, at, head, 0, at) != 0) {
    return false;
  }
  const std::string suffix = name.substr(at, 15);
  return is_shard_suffix(suffix) && pattern.format(suffix) == name;
}

// ---------------------------------------------------------------------------
// Commit protocol

struct Plan {
  std::vector<std::pair<std::string, std::string>> renames; // temporary → final, names in the directory
  std::vector<std::string> removals; // stale files, index files first
};

void write_journal(const std::filesystem::path& directory, const Plan& plan, bool durable) {
  nlohmann::ordered_json j;
  j["version"] = 1;
  j["renames"] = nlohmann::ordered_json::array();
  for (const auto& [from, to] : plan.renames) {
    j["renames"].push_back({from, to});
  }
  j["remove"] = plan.removals;
  const std::string text = j.dump();
  detail::AtomicFile journal(directory / kJournalName);
  journal.write(text.data(), text.size());
  journal.commit(durable); // the commit point
}

void apply_plan(const std::filesystem::path& directory, const Plan& plan, bool durable) {
  for (const auto& [from, to] : plan.renames) {
    std::error_code ec;
    if (std::filesystem::exists(directory / from, ec)) {
      std::filesystem::rename(directory / from, directory / to, ec);
      if (ec) {
        detail::throw_os_error("Cannot rename '" + (directory / from).string() + "' to", directory / to, ec.value());
      }
    }
  }
  for (const std::string& name : plan.removals) {
    std::error_code ec;
    if (std::filesystem::is_regular_file(directory / name, ec)) {
      std::filesystem::remove(directory / name, ec);
    }
  }
  if (durable) {
    detail::fsync_directory(directory);
  }
  std::error_code ec;
  std::filesystem::remove(directory / kJournalName, ec);
  if (durable) {
    detail::fsync_directory(directory);
  }
}

std::string relative_name(const std::filesystem::path& path) {
  return path.filename().string();
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
  const std::set<std::string> discard(discard_names.begin(), discard_names.end());
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
        areas.push_back({reinterpret_cast<std::uintptr_t>(t.data_ptr()), end_address(t), name});
      }
      std::sort(areas.begin(), areas.end(), [](const Area& a, const Area& b) {
        return std::tie(a.start, a.stop, a.name) < std::tie(b.start, b.stop, b.name);
      });
      std::uintptr_t last_stop = 0;
      for (const Area& area : areas) {
        if (subgroups.empty() || area.start >= last_stop) {
          subgroups.emplace_back();
          last_stop = area.stop;
        }
        subgroups.back().push_back(area.name);
        last_stop = std::max(last_stop, area.stop); // the reference keeps only the last stop
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
            "Error while trying to find names to remove to save state dict, but found no suitable name to keep for "
            "saving amongst: " +
            python_set_repr(names) +
            ". None is covering the entire storage. Refusing to save/load the model since you could be storing much "
            "more memory than needed. Please refer to https://huggingface.co/docs/safetensors/torch_shared_tensors "
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

namespace {

// The temporary files of saves in `directory` (names with kTemporaryInfix).
std::vector<std::filesystem::path> temporary_files(const std::filesystem::path& directory) {
  std::vector<std::filesystem::path> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(directory, ec)) {
    if (entry.path().filename().string().find(detail::kTemporaryInfix) != std::string::npos &&
        entry.is_regular_file(ec)) {
      found.push_back(entry.path());
    }
  }
  return found;
}

bool recover_locked(const std::filesystem::path& directory) {
  std::error_code ec;
  const auto journal = directory / kJournalName;
  bool changed = false;
  if (std::filesystem::is_regular_file(journal, ec)) {
    // Committed but not finished: roll forward.
    Plan plan;
    try {
      std::ifstream in(journal);
      const auto j = nlohmann::json::parse(in);
      for (const auto& pair : j.at("renames")) {
        plan.renames.emplace_back(pair.at(0).get<std::string>(), pair.at(1).get<std::string>());
      }
      plan.removals = j.at("remove").get<std::vector<std::string>>();
    } catch (const nlohmann::json::exception& e) {
      throw OSError(
          "The save journal '" + journal.string() + "' left by an interrupted save is damaged (" + e.what() +
          "); inspect the directory and remove the journal by hand.");
    }
    for (const auto& [from, to] : plan.renames) {
      // Journal entries name files in this directory only.
      if (from.find('/') != std::string::npos || to.find('/') != std::string::npos) {
        throw OSError("The save journal '" + journal.string() + "' names a file outside its directory.");
      }
    }
    apply_plan(directory, plan, /*durable=*/true);
    changed = true;
  }
  // Temporary files of a save that never reached its commit point.
  for (const auto& path : temporary_files(directory)) {
    std::filesystem::remove(path, ec);
    changed = true;
  }
  return changed;
}

} // namespace

bool recover_interrupted_save(const std::filesystem::path& directory) {
  // A save in progress holds the lock: its files are not leftovers, and it
  // will finish its own commit.
  const detail::DirectoryLock lock(directory, detail::DirectoryLock::Mode::kExclusive, /*wait=*/false);
  return lock.held() && recover_locked(directory);
}

namespace detail {

DirectoryLock::DirectoryLock(const std::filesystem::path& directory, Mode mode, bool wait) {
  fd_ = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd_ < 0) {
    return; // an unreadable directory: nothing to lock, nothing to recover
  }
  int rc = 0;
  do {
    rc = ::flock(fd_, (mode == Mode::kExclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB));
  } while (rc != 0 && errno == EINTR);
  held_ = rc == 0;
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) {
    ::close(fd_); // releases the lock
  }
}

DirectoryLock::DirectoryLock(DirectoryLock&& other) noexcept : fd_(other.fd_), held_(other.held_) {
  other.fd_ = -1;
  other.held_ = false;
}

void DirectoryLock::downgrade() {
  if (held_) {
    int rc = 0;
    do {
      rc = ::flock(fd_, LOCK_SH);
    } while (rc != 0 && errno == EINTR);
    held_ = rc == 0;
  }
}

DirectoryLock lock_for_reading(const std::filesystem::path& directory) {
  DirectoryLock exclusive(directory, DirectoryLock::Mode::kExclusive, /*wait=*/false);
  if (exclusive.held()) { // no save in progress, no other reader
    recover_locked(directory);
    exclusive.downgrade();
    return exclusive;
  }
  // A save in progress (wait for its commit) or other readers (no wait).
  DirectoryLock shared(directory, DirectoryLock::Mode::kShared, /*wait=*/true);
  std::error_code ec;
  if (!std::filesystem::exists(directory / kJournalName, ec) && temporary_files(directory).empty()) {
    return shared;
  }
  // A saver died: finish or undo its save once the other readers are done.
  { const DirectoryLock release = std::move(shared); }
  DirectoryLock recovering(directory, DirectoryLock::Mode::kExclusive, /*wait=*/true);
  if (recovering.held()) {
    recover_locked(directory);
  }
  recovering.downgrade();
  return recovering;
}

} // namespace detail

void save_torch_state_dict(
    const StateDict& state_dict,
    const std::filesystem::path& save_directory,
    const SaveOptions& options) {
  const bool safe = options.safe_serialization();
  const std::string pattern_text = options.filename_pattern().value_or(
      safe ? kSafetensorsWeightsFilePattern : kPytorchWeightsFilePattern);
  const detail::FilenamePattern pattern(pattern_text);
  Metadata metadata = options.metadata();
  if (const std::string* format = metadata.find("format"); format != nullptr && *format != "pt") {
    throw ValueError(
        "metadata['format'] is '" + *format +
        "', but files written by save_torch_state_dict must say 'pt' (load_state_dict_from_file would reject them).");
  }
  std::error_code ec;
  if (!std::filesystem::is_directory(save_directory, ec)) {
    detail::throw_os_error("Cannot save into", save_directory, ENOENT);
  }
  const detail::DirectoryLock lock(save_directory, detail::DirectoryLock::Mode::kExclusive, /*wait=*/true);
  recover_locked(save_directory);

  // Tied weights: keep one name per storage, record the others in metadata
  // (without touching the caller's dict or metadata).
  StateDict to_save;
  if (safe) {
    const auto dropped = remove_duplicate_names(state_dict, options.shared_tensors_to_discard());
    std::set<std::string> removed;
    for (const auto& item : dropped) {
      for (const std::string& name : item.value()) {
        removed.insert(name);
        if (!metadata.contains(name)) {
          metadata.insert(name, item.key());
        }
      }
    }
    to_save.reserve(state_dict.size() - removed.size());
    for (const auto& item : state_dict) {
      if (removed.count(item.key()) == 0) {
        to_save.insert(item.key(), item.value());
      }
    }
  } else {
    to_save = state_dict;
  }

  const StateDictSplit split = split_torch_state_dict_into_shards(
      to_save, SplitOptions().filename_pattern(pattern_text).max_shard_size(options.max_shard_size()));

  // Stale files are listed before anything is written.
  std::set<std::string> new_names;
  for (const auto& shard : split.filename_to_tensors) {
    new_names.insert(shard.key());
  }
  const std::string index_name = pattern.format("") + kIndexSuffix;
  if (split.is_sharded) {
    new_names.insert(index_name);
  }
  Plan plan;
  if (options.is_main_process()) {
    std::vector<std::string> stale;
    for (const auto& entry : std::filesystem::directory_iterator(save_directory)) {
      const std::string name = entry.path().filename().string();
      if (new_names.count(name) == 0 && entry.is_regular_file(ec) && matches_pattern(pattern, name)) {
        stale.push_back(name);
      }
    }
    // Index files go first, so that no index ever names a removed shard.
    std::stable_partition(stale.begin(), stale.end(), [&](const std::string& n) {
      return n.size() > std::strlen(kIndexSuffix) && n.compare(n.size() - std::strlen(kIndexSuffix), std::string::npos, kIndexSuffix) == 0;
    });
    plan.removals = std::move(stale);
  }

  // Every new file under a temporary name first. Shards are written by up to
  // four threads at once: copying into the page cache is CPU work, and a
  // single writer leaves the other cores idle.
  const auto& shards = split.filename_to_tensors.items();
  const StateDict& tensors = to_save;
  const auto write_shard = [&](std::size_t i) -> std::string {
    const auto& shard = shards[i];
    StateDict shard_dict;
    shard_dict.reserve(shard.value().size());
    for (const std::string& name : shard.value()) {
      shard_dict.insert(name, tensors[name]);
    }
    detail::AtomicFile file(save_directory / shard.key());
    if (safe) {
      SafetensorsMetadata file_metadata{{"format", "pt"}};
      if (!split.is_sharded) {
        for (const auto& item : metadata) {
          file_metadata[item.key()] = item.value();
        }
      }
      const SafetensorsWriter writer(shard_dict, file_metadata, options.force_contiguous());
      file.preallocate(writer.size());
      writer.write([&](const void* data, std::size_t size) { file.write(data, size); });
    } else {
      const std::string stem = std::filesystem::path(shard.key()).stem().string();
      detail::write_torch_save(shard_dict, file, stem.empty() ? "archive" : stem);
    }
    return relative_name(file.keep(options.durable()));
  };
  std::vector<std::string> temporary(shards.size());
  std::vector<std::exception_ptr> failures(shards.size());
  std::atomic<std::size_t> next{0};
  const auto worker = [&] {
    for (std::size_t i = next++; i < shards.size(); i = next++) {
      try {
        temporary[i] = write_shard(i);
      } catch (...) {
        failures[i] = std::current_exception();
        next = shards.size(); // stop handing out work
      }
    }
  };
  const std::size_t workers =
      std::min<std::size_t>(shards.size(), std::clamp<std::size_t>(std::thread::hardware_concurrency(), 1, 4));
  std::vector<std::thread> threads;
  for (std::size_t w = 1; w < workers; ++w) {
    threads.emplace_back(worker);
  }
  worker();
  for (std::thread& t : threads) {
    t.join();
  }
  const auto discard_temporaries = [&] {
    for (const std::string& name : temporary) {
      if (!name.empty()) {
        std::filesystem::remove(save_directory / name, ec);
      }
    }
  };
  for (const std::exception_ptr& failure : failures) {
    if (failure) {
      discard_temporaries(); // the old checkpoint was never touched
      std::rethrow_exception(failure);
    }
  }
  for (std::size_t i = 0; i < shards.size(); ++i) {
    plan.renames.emplace_back(temporary[i], shards[i].key());
  }
  if (split.is_sharded) {
    try {
      const std::string index = detail::index_json(split, metadata);
      detail::AtomicFile file(save_directory / index_name);
      file.write(index.data(), index.size());
      plan.renames.emplace_back(relative_name(file.keep(options.durable())), index_name);
    } catch (...) {
      discard_temporaries();
      throw;
    }
  }
  if (options.durable()) {
    detail::fsync_directory(save_directory);
  }
  write_journal(save_directory, plan, options.durable());
  apply_plan(save_directory, plan, options.durable());
}

void save_torch_model(
    const torch::nn::Module& model,
    const std::filesystem::path& save_directory,
    const SaveOptions& options) {
  save_torch_state_dict(state_dict(model), save_directory, options);
}

} // namespace torchser
