#include "torchser/detail/checkpoint_dir.h"

#include <fcntl.h>
#include <stdio.h> // renameat2
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <system_error>
#include <tuple>
#include <utility>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <torchser/constants.h>
#include <torchser/errors.h>

#include "torchser/detail/dcp_layout.h"
#include "torchser/detail/file.h"
#include "torchser/detail/tensor_file.h"

namespace torchser::detail {
namespace fs = std::filesystem;

namespace {

constexpr const char* kJournalName = ".torchser-commit.json";
// The staging directory of a swap: ".<name>.torchser-save.XXXXXX" beside it.
constexpr const char* kStagingInfix = ".torchser-save.";

bool has_suffix(const std::string& name, const std::string& suffix) {
  return name.size() >= suffix.size() &&
         name.compare(name.size() - suffix.size(), std::string::npos, suffix) ==
             0;
}

bool is_index_name(const std::string& name) {
  return name.size() > std::strlen(kIndexSuffix) &&
         has_suffix(name, kIndexSuffix);
}

// Python's PurePath(name).suffix.
std::string path_suffix(const std::string& name) {
  const std::size_t dot = name.rfind('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == name.size()) {
    return "";
  }
  return name.substr(dot);
}

// ---------------------------------------------------------------------------
// Resolution

const char* const kNoCheckpoint =
    "' does not contain a valid checkpoint. Expected either a sharded "
    "checkpoint with an index file, or a single "
    "model file.";

struct Listing {
  std::vector<fs::path> safetensors;
  std::vector<fs::path> pickles;
  std::vector<fs::path> archives;
  std::vector<fs::path> indexes;
};

// Regular files (or links to them, as in a Hub cache snapshot) by extension,
// sorted so that every message lists them the same way.
Listing list_directory(const fs::path& directory) {
  Listing out;
  std::error_code ec;
  fs::directory_iterator it(directory, ec);
  if (ec) {
    throw_os_error("Cannot list", directory, ec.value());
  }
  for (const auto& entry : it) {
    if (!entry.is_regular_file(ec)) {
      continue;
    }
    const std::string name = entry.path().filename().string();
    const auto ext = entry.path().extension();
    if (is_index_name(name)) {
      out.indexes.push_back(entry.path());
    } else if (ext == ".safetensors") {
      out.safetensors.push_back(entry.path());
    } else if (ext == ".bin") {
      out.pickles.push_back(entry.path());
    } else if (ext == ".dduf") {
      out.archives.push_back(entry.path());
    }
  }
  for (auto* list :
       {&out.safetensors, &out.pickles, &out.archives, &out.indexes}) {
    std::sort(list->begin(), list->end());
  }
  return out;
}

Checkpoint sharded(const fs::path& index_path) {
  Checkpoint out;
  out.kind = Checkpoint::Kind::kSharded;
  out.index_path = index_path;
  out.directory = index_path.parent_path();
  const std::string name = index_path.filename().string();
  // "<pattern>.index.json": every shard carries the pattern's extension.
  out.index = read_index(
      index_path,
      path_suffix(name.substr(0, name.size() - std::strlen(kIndexSuffix))));
  for (const auto& [shard, keys] : out.index.shards) {
    out.files.push_back(out.directory / shard);
  }
  return out;
}

} // namespace

Checkpoint resolve_checkpoint(
    const fs::path& target, const ResolveOptions& options) {
  std::error_code ec;
  if (!fs::exists(target, ec)) {
    throw FileNotFoundError(
        "No checkpoint found at '" + target.string() +
        "': no such file or directory.");
  }
  if (!fs::is_directory(target, ec)) {
    const std::string name = target.filename().string();
    if (is_index_name(name)) {
      return sharded(target);
    }
    Checkpoint out;
    out.directory = target.parent_path();
    out.files = {target};
    if (target.extension() == ".dduf") {
      if (!options.allow_dduf) {
        throw ValueError(
            "'" + target.string() +
            "' is a DDUF archive, which holds several models: open it with "
            "read_dduf_file and load "
            "one entry with load_torch_model(model, entry).");
      }
      out.kind = Checkpoint::Kind::kDDUF;
    }
    return out;
  }

  const fs::path& directory = target;
  std::vector<std::string> patterns;
  if (options.filename_pattern.has_value()) {
    patterns.push_back(*options.filename_pattern);
  } else {
    patterns.push_back(kSafetensorsWeightsFilePattern);
    if (options.allow_pickle) {
      patterns.push_back(kPytorchWeightsFilePattern);
    }
  }
  for (const std::string& pattern : patterns) {
    const fs::path index =
        directory / (FilenamePattern(pattern).format("") + kIndexSuffix);
    if (fs::is_regular_file(index, ec)) {
      Checkpoint out = sharded(index);
      out.is_directory = true;
      return out;
    }
  }
  const Listing files = list_directory(directory);
  // A folder whose only index has another pattern's name (diffusers'
  // "diffusion_pytorch_model.safetensors.index.json"): the Hub's loader
  // would give up; its shards are as good as any.
  if (!options.filename_pattern.has_value() && files.indexes.size() == 1) {
    const std::string name = files.indexes.front().filename().string();
    const std::string ext =
        path_suffix(name.substr(0, name.size() - std::strlen(kIndexSuffix)));
    if (ext == ".safetensors" || (ext == ".bin" && options.allow_pickle)) {
      Checkpoint out = sharded(files.indexes.front());
      out.is_directory = true;
      return out;
    }
  }
  // PyTorch DCP's sharded layout: nothing but its shard files, more than
  // one (one file, of a one-rank save, holds whole tensors: a single-file
  // checkpoint to any loader).
  const bool dcp_layout = files.safetensors.size() > 1 &&
                          std::all_of(
                              files.safetensors.begin(),
                              files.safetensors.end(),
                              [](const fs::path& p) {
                                return is_dcp_shard_name(p.filename().string());
                              });
  if (dcp_layout && options.allow_dcp) {
    Checkpoint out;
    out.kind = Checkpoint::Kind::kDcpSharded;
    out.directory = directory;
    out.files = files.safetensors;
    out.is_directory = true;
    return out;
  }
  const std::string dcp_hint =
      !dcp_layout ? std::string()
                  : " It holds PyTorch DCP's sharded layout (" +
                        std::to_string(files.safetensors.size()) +
                        " shard-…-model-…-of-….safetensors files): load it "
                        "with the distributed load_torch_state_dict (on any "
                        "number of ranks, one included), or consolidate it "
                        "first (torchser consolidate " +
                        directory.string() + " OUT).";
  const auto single =
      [&](const std::vector<fs::path>& found) -> std::optional<Checkpoint> {
    if (found.size() > 1) {
      throw ValueError(
          "Directory '" + directory.string() + kNoCheckpoint + dcp_hint);
    }
    if (found.empty()) {
      return std::nullopt;
    }
    Checkpoint out;
    out.directory = directory;
    out.files = found;
    out.is_directory = true;
    return out;
  };
  if (auto out = single(files.safetensors)) {
    if (!files.pickles.empty()) {
      out->note = "using " + files.safetensors.front().filename().string() +
                  "; '" + directory.string() + "' also holds " +
                  files.pickles.front().filename().string() +
                  " (safetensors first, as load_torch_model)";
    }
    return *out;
  }
  if (options.allow_pickle) {
    if (auto out = single(files.pickles)) {
      return *out;
    }
  }
  if (options.allow_dduf && files.safetensors.empty() &&
      files.pickles.empty() && files.archives.size() == 1) {
    Checkpoint out;
    out.kind = Checkpoint::Kind::kDDUF;
    out.directory = directory;
    out.files = files.archives;
    return out;
  }
  // The reference's message, and where it would mislead (a pickle checkpoint
  // when pickles are not allowed), the way out.
  std::string hint;
  if (!options.allow_pickle && !options.filename_pattern.has_value()) {
    const fs::path pickle_index =
        directory /
        (FilenamePattern(kPytorchWeightsFilePattern).format("") + kIndexSuffix);
    if (fs::is_regular_file(pickle_index, ec)) {
      hint = " It holds a pickle checkpoint (" +
             pickle_index.filename().string() +
             "): pass LoadOptions().safe(false) to load it (torchser's pickle "
             "reader never runs code from a file).";
    } else if (files.pickles.size() == 1) {
      hint =
          " It holds a pickle .bin file: pass LoadOptions().safe(false) to "
          "load it (torchser's pickle reader "
          "never runs code from a file).";
    }
  }
  if (dcp_layout) {
    hint = dcp_hint;
  }
  if (options.allow_dduf && files.archives.size() > 1) {
    hint = " It holds " + std::to_string(files.archives.size()) +
           " .dduf archives: name the one to use.";
  }
  throw ValueError("Directory '" + directory.string() + kNoCheckpoint + hint);
}

VerifyReport verify_checkpoint(const Checkpoint& checkpoint) {
  VerifyReport report;
  std::map<std::string, std::set<std::string>>
      held; // shard name → the tensors it holds
  std::uint64_t data_bytes = 0;
  bool pickle = false;
  std::error_code ec;
  for (const fs::path& path : checkpoint.files) {
    if (checkpoint.kind == Checkpoint::Kind::kSharded &&
        !fs::is_regular_file(path, ec)) {
      throw FileNotFoundError(
          "Shard '" + path.string() + "' named by the index " +
          checkpoint.index_path.filename().string() + " is missing.");
    }
    const auto file = verify_tensor_file(path);
    if (!file->note().empty()) {
      report.notes.push_back(file->note());
    }
    pickle = pickle || file->format() == TensorFormat::kPickle;
    // The index's own name for a shard (it may sit in a subfolder).
    std::string shard_name = path.filename().string();
    for (const auto& item : checkpoint.index.shards) {
      if (checkpoint.directory / item.first == path) {
        shard_name = item.first;
      }
    }
    std::set<std::string>& names = held[shard_name];
    std::set<std::string> storages;
    for (const TensorEntry& entry : file->entries()) {
      names.insert(entry.name);
      if (entry.storage.empty()) {
        data_bytes += entry.nbytes;
      } else if (storages.insert(entry.storage).second) {
        data_bytes += entry.storage_bytes;
      }
    }
    report.tensors += names.size();
  }
  report.files = checkpoint.files.size();
  if (checkpoint.kind != Checkpoint::Kind::kSharded) {
    return report;
  }
  // The index and the shards agree exactly: a loader follows the index, so a
  // tensor in another shard than it says, or one it does not list, is a
  // checkpoint that loads wrong or not at all.
  const std::string index = checkpoint.index_path.filename().string();
  for (const auto& [shard, keys] : checkpoint.index.shards) {
    for (const std::string& key : keys) {
      if (held[shard].count(key) == 0) {
        std::string elsewhere;
        for (const auto& [other, names] : held) {
          if (names.count(key) != 0) {
            elsewhere = " (it is in '" + other + "')";
          }
        }
        throw ValueError(
            "The index " + index + " names tensor '" + key + "' in '" + shard +
            "', but that shard does not hold it" + elsewhere + ".");
      }
    }
  }
  for (const auto& [shard, names] : held) {
    for (const std::string& name : names) {
      if (checkpoint.index.keys.count(name) == 0) {
        throw ValueError(
            "Shard '" + shard + "' holds tensor '" + name +
            "', which the index " + index +
            " does not list: loaders following the index skip it.");
      }
    }
  }
  // huggingface_hub's total_size counts each storage once: the shards' bytes
  // exactly for torch.save files; for safetensors at least the tensors'
  // bytes (more where tensors were views of larger storages).
  for (const auto& [key, text] : checkpoint.index.other_metadata) {
    if (key != "total_size") {
      continue;
    }
    const auto value =
        nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!value.is_number_integer() && !value.is_number_unsigned()) {
      throw ValueError(
          "The index " + index + " says total_size " + text +
          ", which is not a whole number of bytes.");
    }
    const auto total = value.get<std::int64_t>();
    const auto bytes = static_cast<std::int64_t>(data_bytes);
    if (total < bytes || (pickle && total != bytes)) {
      throw ValueError(
          "The index " + index + " says total_size " + std::to_string(total) +
          ", but its shards hold " + std::to_string(bytes) +
          " bytes of tensor data: the index belongs to another checkpoint.");
    }
    if (total > bytes) {
      report.notes.push_back(
          "the index " + index + " says total_size " + std::to_string(total) +
          ", " + std::to_string(total - bytes) +
          " bytes more than its shards hold (tensors saved as views of larger "
          "storages)");
    }
  }
  return report;
}

// ---------------------------------------------------------------------------
// The lock

namespace {

bool same_inode(int fd, const fs::path& path) {
  struct stat opened {};
  struct stat named {};
  return ::fstat(fd, &opened) == 0 && ::stat(path.c_str(), &named) == 0 &&
         opened.st_dev == named.st_dev && opened.st_ino == named.st_ino;
}

int flock_retrying(int fd, int operation) {
  int rc = 0;
  do {
    rc = ::flock(fd, operation);
  } while (rc != 0 && errno == EINTR);
  return rc;
}

} // namespace

namespace {

// Opens and flocks `directory` until the lock is granted on the directory
// the path names at that moment (a waiter woken on a swapped-out directory
// tries again on the new one). Returns the descriptor (-1 when the
// directory cannot be opened) and whether the lock is held.
std::pair<int, bool> acquire(const fs::path& directory, int operation) {
  for (;;) {
    const int fd =
        ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      return {-1, false}; // an unreadable directory: nothing to lock, nothing
                          // to recover
    }
    const bool held = flock_retrying(fd, operation) == 0;
    if (!held || same_inode(fd, directory)) {
      return {fd, held};
    }
    ::close(fd);
  }
}

} // namespace

DirectoryLock::DirectoryLock(const fs::path& directory, Mode mode, bool wait)
    : path_(directory) {
  std::tie(fd_, held_) = acquire(
      directory,
      (mode == Mode::kExclusive ? LOCK_EX : LOCK_SH) | (wait ? 0 : LOCK_NB));
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) {
    ::close(fd_); // releases the lock
  }
}

DirectoryLock::DirectoryLock(DirectoryLock&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      held_(std::exchange(other.held_, false)) {}

void DirectoryLock::downgrade() {
  if (!held_) {
    return;
  }
  held_ = flock_retrying(fd_, LOCK_SH) == 0;
  if (held_ && !same_inode(fd_, path_)) {
    // A save swapped the directory between the two steps.
    ::close(fd_);
    std::tie(fd_, held_) = acquire(path_, LOCK_SH);
  }
}

// ---------------------------------------------------------------------------
// Leftovers of interrupted saves, and recovery

namespace {

struct Plan {
  std::vector<std::pair<std::string, std::string>>
      renames; // temporary → final, names in the directory
  std::vector<std::string> removals; // stale files, index files first
};

// Temporary files of saves in `directory` (AtomicFile's names).
std::vector<fs::path> temporary_files(const fs::path& directory) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(directory, ec)) {
    if (entry.path().filename().string().find(kTemporaryInfix) !=
            std::string::npos &&
        entry.is_regular_file(ec)) {
      found.push_back(entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

// The real parent and name of `directory` (symbolic links resolved: a swap
// replaces the directory, never a link to it).
std::pair<fs::path, std::string> parent_and_name(const fs::path& directory) {
  std::error_code ec;
  fs::path real = fs::canonical(directory, ec);
  if (ec) {
    real = fs::absolute(directory, ec).lexically_normal();
  }
  return {real.parent_path(), real.filename().string()};
}

// Staging directories of swaps of `directory`, before or after their swap.
std::vector<fs::path> staging_directories(const fs::path& directory) {
  const auto [parent, name] = parent_and_name(directory);
  std::vector<fs::path> found;
  if (name.empty()) {
    return found;
  }
  const std::string prefix = "." + name + kStagingInfix;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(parent, ec)) {
    const std::string entry_name = entry.path().filename().string();
    if (entry_name.size() == prefix.size() + 6 &&
        entry_name.compare(0, prefix.size(), prefix) == 0 &&
        entry.is_directory(ec) && !entry.is_symlink(ec)) {
      found.push_back(entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

void write_journal(const fs::path& directory, const Plan& plan, bool durable) {
  nlohmann::ordered_json j;
  j["version"] = 1;
  j["renames"] = nlohmann::ordered_json::array();
  for (const auto& [from, to] : plan.renames) {
    j["renames"].push_back({from, to});
  }
  j["remove"] = plan.removals;
  const std::string text = j.dump();
  AtomicFile journal(directory / kJournalName);
  journal.write(text.data(), text.size());
  journal.commit(durable); // the commit point
}

void apply_plan(const fs::path& directory, const Plan& plan, bool durable) {
  for (const auto& [from, to] : plan.renames) {
    std::error_code ec;
    if (fs::exists(directory / from, ec)) {
      fs::rename(directory / from, directory / to, ec);
      if (ec) {
        throw_os_error(
            "Cannot rename '" + (directory / from).string() + "' to",
            directory / to,
            ec.value());
      }
    }
  }
  for (const std::string& name : plan.removals) {
    std::error_code ec;
    if (fs::is_regular_file(directory / name, ec)) {
      fs::remove(directory / name, ec);
    }
  }
  if (durable) {
    fsync_directory(directory);
  }
  std::error_code ec;
  fs::remove(directory / kJournalName, ec);
  if (durable) {
    fsync_directory(directory);
  }
}

Plan read_journal(const fs::path& journal) {
  Plan plan;
  try {
    std::ifstream in(journal);
    const auto j = nlohmann::json::parse(in);
    for (const auto& pair : j.at("renames")) {
      plan.renames.emplace_back(
          pair.at(0).get<std::string>(), pair.at(1).get<std::string>());
    }
    plan.removals = j.at("remove").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception& e) {
    throw OSError(
        "The save journal '" + journal.string() +
        "' left by an interrupted save is damaged (" + e.what() +
        "); inspect the directory and remove the journal by hand.");
  }
  // Names of files in this directory itself: inside it, and no deeper.
  const auto inside = [](const std::string& name) {
    return !name.empty() && name != "." && !escapes_directory(name) &&
           name.find_first_of("/\\") == std::string::npos &&
           name.find('\0') == std::string::npos;
  };
  for (const auto& [from, to] : plan.renames) {
    if (!inside(from) || !inside(to)) {
      throw OSError(
          "The save journal '" + journal.string() +
          "' names a file outside its directory.");
    }
  }
  for (const std::string& name : plan.removals) {
    if (!inside(name)) {
      throw OSError(
          "The save journal '" + journal.string() +
          "' names a file outside its directory.");
    }
  }
  return plan;
}

} // namespace

bool recover_locked(const fs::path& directory) {
  std::error_code ec;
  bool changed = false;
  const fs::path journal = directory / kJournalName;
  if (fs::is_regular_file(journal, ec)) {
    apply_plan(
        directory,
        read_journal(journal),
        /*durable=*/true); // committed: roll forward
    changed = true;
  }
  for (const fs::path& path : temporary_files(directory)) {
    fs::remove(path, ec); // a journal save that never reached its commit point
    changed = true;
  }
  for (const fs::path& path : staging_directories(directory)) {
    // Before its swap: the new checkpoint, never committed. After it: the
    // old one. Either way not the checkpoint. (A save still deleting its old
    // directory races harmlessly with this.)
    fs::remove_all(path, ec);
    changed = true;
  }
  return changed;
}

DirectoryLock lock_for_reading(const fs::path& directory) {
  DirectoryLock exclusive(
      directory, DirectoryLock::Mode::kExclusive, /*wait=*/false);
  if (exclusive.held()) { // no save in progress, no other reader
    recover_locked(directory);
    exclusive.downgrade();
    return exclusive;
  }
  // A save in progress (wait for its commit) or other readers (no wait).
  DirectoryLock shared(directory, DirectoryLock::Mode::kShared, /*wait=*/true);
  std::error_code ec;
  if (!fs::exists(directory / kJournalName, ec) &&
      temporary_files(directory).empty()) {
    return shared; // staging directories beside it do not change what it holds
  }
  // A saver died after its commit point: finish it once the other readers are
  // done.
  { const DirectoryLock release = std::move(shared); }
  DirectoryLock recovering(
      directory, DirectoryLock::Mode::kExclusive, /*wait=*/true);
  if (recovering.held()) {
    recover_locked(directory);
  }
  recovering.downgrade();
  return recovering;
}

std::optional<std::string> interrupted_save(const fs::path& directory) {
  std::error_code ec;
  if (!fs::is_directory(directory, ec)) {
    return std::nullopt;
  }
  // Readers share the lock; only a save (or a recovery) holds it alone.
  const bool in_progress =
      !DirectoryLock(directory, DirectoryLock::Mode::kShared, /*wait=*/false)
           .held();
  const fs::path journal = directory / kJournalName;
  const auto temporaries = temporary_files(directory);
  const auto staging = staging_directories(directory);
  if (in_progress &&
      (fs::exists(journal, ec) || !temporaries.empty() || !staging.empty())) {
    return "a save into '" + directory.string() +
           "' is in progress (another process holds its lock)";
  }
  if (fs::exists(journal, ec)) {
    return "a save into '" + directory.string() +
           "' was interrupted after its commit point: " +
           journal.filename().string() +
           " is there, and until torchser completes the save (any torchser "
           "save or load of the directory, or "
           "`torchser recover`) the folder mixes old and new files";
  }
  std::vector<std::string> left;
  for (const fs::path& path : temporaries) {
    left.push_back(path.filename().string());
  }
  for (const fs::path& path : staging) {
    left.push_back(path.string() + "/");
  }
  if (left.empty()) {
    return std::nullopt;
  }
  std::string list;
  for (const std::string& name : left) {
    list += (list.empty() ? "'" : ", '") + name + "'";
  }
  return "a save into '" + directory.string() +
         "' was interrupted before its commit point and left " + list +
         "; the folder holds the previous checkpoint, whole (any torchser save "
         "or load of the directory, or "
         "`torchser recover`, removes the leftovers)";
}

// ---------------------------------------------------------------------------
// Stale files: whole names of the pattern, the pattern never a regex.

namespace {

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

bool matches_pattern(const FilenamePattern& pattern, std::string name) {
  if (is_index_name(name)) {
    name.resize(name.size() - std::strlen(kIndexSuffix));
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

} // namespace

std::vector<std::string> stale_files(
    const fs::path& directory,
    const FilenamePattern& pattern,
    const std::vector<std::string>& keep) {
  const std::set<std::string> kept(keep.begin(), keep.end());
  std::vector<std::string> stale;
  std::error_code ec;
  fs::directory_iterator it(directory, ec);
  if (ec) {
    throw_os_error("Cannot list", directory, ec.value());
  }
  for (const auto& entry : it) {
    const std::string name = entry.path().filename().string();
    if (kept.count(name) == 0 && entry.is_regular_file(ec) &&
        matches_pattern(pattern, name)) {
      stale.push_back(name);
    }
  }
  std::sort(stale.begin(), stale.end());
  std::stable_partition(stale.begin(), stale.end(), is_index_name);
  return stale;
}

// ---------------------------------------------------------------------------
// The commit

struct CheckpointCommit::State {
  fs::path directory;
  bool durable = false;
  DirectoryLock lock;
  Mode mode = Mode::kJournal;
  fs::path
      staging; // kSwap: the sibling directory the new checkpoint is built in
  fs::path
      real; // kSwap: the directory itself, links resolved (what is swapped)
  std::unique_ptr<DirectoryLock> staging_lock; // kSwap: the new directory's
  std::mutex mutex;
  std::vector<std::pair<std::string, fs::path>>
      staged; // final name → temporary
  std::vector<std::string> removals;
  bool committed = false;

  State(const fs::path& dir, bool durable_)
      : directory(dir),
        durable(durable_),
        lock(dir, DirectoryLock::Mode::kExclusive, /*wait=*/true) {}
};

namespace {

// Whether `directory` can be swapped: not a mount point, not this process's
// working directory (which would be left in the deleted old one), no
// subdirectories (which cannot be hard-linked into the new one).
bool swappable(const fs::path& directory, const fs::path& parent) {
  struct stat dir {};
  struct stat up {};
  if (::stat(directory.c_str(), &dir) != 0 ||
      ::stat(parent.c_str(), &up) != 0 || dir.st_dev != up.st_dev ||
      (dir.st_ino == up.st_ino)) {
    return false;
  }
  // A bind mount has its parent's st_dev, but renames across it fail too.
  struct statx root {};
  if (::statx(AT_FDCWD, directory.c_str(), 0, STATX_BASIC_STATS, &root) == 0 &&
      (root.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) != 0 &&
      (root.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0) {
    return false;
  }
  std::error_code ec;
  const fs::path here = fs::current_path(ec);
  const fs::path real = fs::canonical(directory, ec);
  if (!ec) {
    for (fs::path at = here; !at.empty(); at = at.parent_path()) {
      if (at == real) {
        return false;
      }
      if (at == at.parent_path()) {
        break;
      }
    }
  }
  for (const auto& entry : fs::directory_iterator(directory, ec)) {
    const auto status = entry.symlink_status(ec);
    if (ec || !(fs::is_regular_file(status) || fs::is_symlink(status))) {
      return false;
    }
  }
  return !ec;
}

void rename_checked(const fs::path& from, const fs::path& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    throw_os_error("Cannot rename '" + from.string() + "' to", to, errno);
  }
}

// A new name for the temporary that becomes `name` in `directory`.
fs::path temporary_beside(const fs::path& directory, const std::string& name) {
  std::string templ =
      (directory / (name + kTemporaryInfix + "XXXXXX")).string();
  const int fd = ::mkstemp(templ.data());
  if (fd < 0) {
    throw_os_error("Cannot create a temporary file in", directory, errno);
  }
  ::close(fd);
  return templ;
}

} // namespace

CheckpointCommit::CheckpointCommit(
    const fs::path& directory, std::size_t new_files, bool durable)
    : state_(std::make_unique<State>(directory, durable)) {
  recover_locked(directory);
  if (new_files == 1) {
    state_->mode = Mode::kSingleFile;
    return;
  }
  prepare_swap();
}

void CheckpointCommit::prepare_swap() {
  state_->mode = Mode::kJournal;
  const fs::path& directory = state_->directory;
  const auto [parent, name] = parent_and_name(directory);
  if (name.empty() || !swappable(directory, parent)) {
    return;
  }
  std::string templ =
      (parent / ("." + name + kStagingInfix + "XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) {
    return; // a read-only parent: the journal works inside the directory
  }
  state_->staging = templ;
  state_->real = parent / name;
  state_->mode = Mode::kSwap;
  // Held until the commit returns: from the swap on, the path names this
  // directory, and no other save or recovery may enter it before the old
  // one is deleted.
  state_->staging_lock = std::make_unique<DirectoryLock>(
      state_->staging, DirectoryLock::Mode::kExclusive, /*wait=*/false);
  struct stat st {};
  if (::stat(directory.c_str(), &st) == 0) {
    // The new directory looks like the old one to its users.
    ::chmod(templ.c_str(), st.st_mode & 07777);
    if (::chown(templ.c_str(), st.st_uid, st.st_gid) != 0) {
      // Only root may give a directory away; the owner stays the saver.
    }
  }
}

CheckpointCommit::~CheckpointCommit() {
  if (state_->committed) {
    return;
  }
  std::error_code ec;
  for (const auto& [name, temporary] : state_->staged) {
    fs::remove(temporary, ec);
  }
  if (!state_->staging.empty()) {
    fs::remove_all(state_->staging, ec);
  }
}

CheckpointCommit::Mode CheckpointCommit::mode() const {
  return state_->mode;
}

fs::path CheckpointCommit::target(const std::string& name) const {
  return (state_->mode == Mode::kSwap ? state_->staging : state_->directory) /
         name;
}

void CheckpointCommit::stage(
    const std::string& name, const fs::path& temporary) {
  const std::lock_guard<std::mutex> guard(state_->mutex);
  state_->staged.emplace_back(name, temporary);
}

void CheckpointCommit::remove(std::vector<std::string> names) {
  // One new file replacing several old ones (a single file over a sharded
  // checkpoint) is more than one rename: it needs the swap too, or the old
  // shards would linger beside the new file after a kill.
  if (state_->mode == Mode::kSingleFile && !names.empty()) {
    TORCH_CHECK(
        state_->staged.empty(), "CheckpointCommit::remove() after stage()");
    prepare_swap();
  }
  state_->removals = std::move(names);
}

namespace {

// Enters what the new checkpoint keeps of the old directory into `staging`:
// hard links (a copy where linking is refused), symbolic links as they are.
// False when something cannot be carried over (a subdirectory appeared).
bool carry_over(
    const fs::path& directory,
    const fs::path& staging,
    const std::set<std::string>& skip) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(directory)) {
    const std::string name = entry.path().filename().string();
    if (skip.count(name) != 0 || name == kJournalName ||
        name.find(kTemporaryInfix) != std::string::npos) {
      continue;
    }
    const auto status = entry.symlink_status(ec);
    if (fs::is_symlink(status)) {
      fs::create_symlink(fs::read_symlink(entry.path()), staging / name);
    } else if (fs::is_regular_file(status)) {
      if (::link(entry.path().c_str(), (staging / name).c_str()) != 0) {
        // protected_hardlinks, or a filesystem without links.
        fs::copy_file(
            entry.path(), staging / name, fs::copy_options::overwrite_existing);
      }
    } else {
      return false;
    }
  }
  return true;
}

} // namespace

namespace {

int renameat2_exchange(const char* from, const char* to) {
  return ::renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_EXCHANGE);
}

std::atomic<ExchangeDirectories> exchange_directories{renameat2_exchange};

} // namespace

ExchangeDirectories replace_exchange_for_testing(ExchangeDirectories exchange) {
  return exchange_directories.exchange(exchange);
}

void CheckpointCommit::commit() {
  State& s = *state_;
  std::set<std::string> new_names;
  for (const auto& [name, temporary] : s.staged) {
    new_names.insert(name);
  }
  const std::set<std::string> removed(s.removals.begin(), s.removals.end());
  if (s.mode == Mode::kSingleFile) {
    for (const auto& [name, temporary] : s.staged) {
      rename_checked(temporary, s.directory / name);
    }
    s.committed = true;
    if (s.durable) {
      fsync_directory(s.directory);
    }
    std::error_code ec;
    for (const std::string& name : s.removals) { // index files first
      fs::remove(s.directory / name, ec);
    }
    if (s.durable && !s.removals.empty()) {
      fsync_directory(s.directory);
    }
    return;
  }
  if (s.mode == Mode::kSwap) {
    // The new checkpoint, complete in the staging directory.
    for (auto& [name, temporary] : s.staged) {
      rename_checked(temporary, s.staging / name);
      temporary = s.staging / name;
    }
    std::set<std::string> skip = new_names;
    skip.insert(removed.begin(), removed.end());
    bool swapped = false;
    int error = 0;
    if (carry_over(s.directory, s.staging, skip)) {
      if (s.durable) {
        fsync_directory(s.staging);
      }
      swapped =
          exchange_directories.load()(s.staging.c_str(), s.real.c_str()) == 0;
      error = swapped ? 0 : errno;
    }
    if (swapped) {
      s.committed = true; // the commit point
      const fs::path old = s.staging;
      if (s.durable) {
        fsync_directory(old.parent_path());
      }
      // Files another process added to the old directory during the save
      // move over rather than disappear with it.
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(old, ec)) {
        const std::string name = entry.path().filename().string();
        if (skip.count(name) == 0 && name != kJournalName &&
            name.find(kTemporaryInfix) == std::string::npos &&
            !fs::exists(fs::symlink_status(s.directory / name, ec))) {
          fs::rename(entry.path(), s.directory / name, ec);
        }
      }
      fs::remove_all(old, ec);
      return;
    }
    if (error != 0 && error != EINVAL && error != ENOSYS && error != EXDEV &&
        error != EBUSY && error != EPERM && error != ENOTSUP &&
        error != EACCES) {
      throw_os_error(
          "Cannot swap in the new checkpoint built in '" + s.staging.string() +
              "' for",
          s.directory,
          error);
    }
    // No exchange here: the staged files move beside the old ones and the
    // journal commits them.
    for (auto& [name, temporary] : s.staged) {
      const fs::path beside = temporary_beside(s.directory, name);
      try {
        rename_checked(temporary, beside);
      } catch (...) {
        std::error_code ignored;
        fs::remove(beside, ignored);
        throw;
      }
      temporary = beside;
    }
    std::error_code ec;
    fs::remove_all(s.staging, ec);
    s.staging.clear();
    s.mode = Mode::kJournal;
  }
  Plan plan;
  for (const auto& [name, temporary] : s.staged) {
    plan.renames.emplace_back(temporary.filename().string(), name);
  }
  plan.removals = s.removals;
  if (s.durable) {
    fsync_directory(s.directory);
  }
  try {
    write_journal(s.directory, plan, s.durable);
  } catch (...) {
    // Renamed into place but not fsynced: committed all the same, and the
    // next recovery needs every file it names.
    std::error_code ec;
    s.committed = fs::exists(s.directory / kJournalName, ec);
    throw;
  }
  s.committed = true;
  apply_plan(s.directory, plan, s.durable);
}

} // namespace torchser::detail
