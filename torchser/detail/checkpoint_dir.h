#pragma once

// The checkpoint as a set of files in a directory: which files make it, the
// lock that orders saves and loads of it, and the commit that replaces one
// checkpoint by the next. Every job (save, load, DDUF export) and every CLI
// command goes through here, so they agree on what "the checkpoint" is.
// Never installed; exported only so that the tests can reach it.
//
// The commit, and what each reader sees after a kill at any point:
//
// - Swap (the default). The new checkpoint is built in a sibling directory
//   `.<name>.torchser-save.XXXXXX`: the new files, plus hard links to the
//   files of the directory the save does not own (config.json, a README,
//   other patterns' files). One renameat2(RENAME_EXCHANGE) swaps the two
//   directories; then the old one is deleted. Until the swap every reader
//   sees the whole old checkpoint, after it the whole new one, whether it
//   knows torchser or not (Python's torch.load through the index,
//   safetensors.safe_open, huggingface_hub, transformers).
// - Journal (the fallback where a swap cannot work: the directory is a mount
//   point or the process's working directory, it holds subdirectories, its
//   parent is not writable, or the filesystem has no RENAME_EXCHANGE). New
//   files are written beside the old ones under temporary names; a journal
//   `.torchser-commit.json` is the commit point; then the files are renamed
//   into place. Each file is always whole, but a reader that does not know
//   torchser may see a mix of old and new shards after a kill until the next
//   torchser save or load of the directory rolls the journal forward.
//
// The lock is a flock on the directory itself (no lock file shows among the
// checkpoint's files). A swap gives the path a new inode, so every lock is
// taken on the directory the path names *after* the lock is granted: a
// waiter that wakes up holding the lock of a swapped-out directory tries
// again on the new one.

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torchser/export.h>

#include "torchser/detail/index_json.h"
#include "torchser/detail/python_format.h"

namespace torchser::detail {

// ---------------------------------------------------------------------------
// Which files make a checkpoint

struct TORCHSER_API ResolveOptions {
  /// The pattern whose index marks a sharded checkpoint; unset: the Hub's
  /// safetensors pattern, then (when pickle is allowed) the pickle one, then
  /// a folder's only `*.index.json`.
  std::optional<std::string> filename_pattern;
  /// Whether pickle `.bin` checkpoints count (LoadOptions::safe(false)).
  bool allow_pickle = false;
  /// Whether a `.dduf` archive (or a folder holding only one) counts: the
  /// CLI's commands take one; a module load does not.
  bool allow_dduf = false;
  /// Whether a folder of PyTorch DCP's sharded layout counts (only shard
  /// files, see dcp_layout.h): the distributed load takes one; the others
  /// are told to use it or to consolidate first.
  bool allow_dcp = false;
};

struct TORCHSER_API Checkpoint {
  enum class Kind { kFile, kSharded, kDDUF, kDcpSharded };
  Kind kind = Kind::kFile;
  /// The folder of the checkpoint (a single file's parent).
  std::filesystem::path directory;
  /// kSharded: the index file.
  std::filesystem::path index_path;
  /// kSharded: what the index says (shards validated not to leave the
  /// folder and to carry the index's extension).
  IndexFile index;
  /// The tensor files: shards in sorted order (kDcpSharded: DCP's shard
  /// files), or the single file or archive.
  std::vector<std::filesystem::path> files;
  /// What was chosen over what else, for the CLI to say ("using
  /// model.safetensors; the folder also holds pytorch_model.bin").
  std::string note;
  /// Whether the target was a directory (the lock and recovery apply).
  bool is_directory = false;
};

/// Resolves `target` (a file, an index file, a checkpoint folder, or a folder
/// holding one DDUF archive) with one set of rules and messages. Throws
/// ValueError (the reference's "does not contain a valid checkpoint", with a
/// hint when a pickle checkpoint is there but not allowed) and
/// FileNotFoundError.
TORCHSER_API Checkpoint resolve_checkpoint(
    const std::filesystem::path& target, const ResolveOptions& options);

/// What verify_checkpoint() found.
struct TORCHSER_API VerifyReport {
  std::size_t files = 0;
  std::size_t tensors = 0;
  /// Things a user may want to know that do not make the checkpoint invalid.
  std::vector<std::string> notes;
};

/// Every rule a loader relies on: each file by its format's rules (and
/// torch.save records' CRC-32s); for a sharded checkpoint, every shard
/// present, every tensor in the shard the index names, none unlisted, and
/// "total_size" consistent with the shards' bytes. Throws the format's error,
/// FileNotFoundError or ValueError naming the file and the tensor.
TORCHSER_API VerifyReport verify_checkpoint(const Checkpoint& checkpoint);

// ---------------------------------------------------------------------------
// The lock

class TORCHSER_API DirectoryLock {
 public:
  enum class Mode { kShared, kExclusive };
  /// Locks the directory `directory` names (see the file comment on inode
  /// changes). Not held when it cannot be opened or the filesystem has no
  /// flock (some network mounts), or with wait=false when another holds it.
  DirectoryLock(const std::filesystem::path& directory, Mode mode, bool wait);
  ~DirectoryLock();
  DirectoryLock(DirectoryLock&& other) noexcept;
  DirectoryLock& operator=(DirectoryLock&&) = delete;
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

  bool held() const {
    return held_;
  }
  /// Exclusive → shared (not atomic: a waiting saver may go first, after
  /// which this waits for it, on the directory the path then names).
  void downgrade();

 private:
  std::filesystem::path path_;
  int fd_ = -1;
  bool held_ = false;
};

/// The lock a load of `directory` holds while it reads: shared, after
/// completing any interrupted save (which needs it exclusively for a moment).
TORCHSER_API DirectoryLock
lock_for_reading(const std::filesystem::path& directory);

/// Completes or undoes an interrupted save; the caller holds the exclusive
/// lock. Returns whether it changed anything.
TORCHSER_API bool recover_locked(const std::filesystem::path& directory);

/// What an interrupted save left in or beside `directory`, said for a user
/// (nullopt when nothing), without changing anything: verify and inspect
/// report it. A save in progress is said as such.
TORCHSER_API std::optional<std::string> interrupted_save(
    const std::filesystem::path& directory);

// ---------------------------------------------------------------------------
// The commit

/// The files of `directory` that a save with `pattern` replaces (whole names
/// of the pattern, with or without a shard suffix, and their index; the
/// pattern is never a regex), minus `keep`; index files first, so that no
/// index ever names a removed shard.
TORCHSER_API std::vector<std::string> stale_files(
    const std::filesystem::path& directory,
    const FilenamePattern& pattern,
    const std::vector<std::string>& keep);

/// One save's replacement of a checkpoint (see the file comment). The
/// constructor takes the directory's lock exclusively (waiting for other
/// saves), completes any interrupted save, and picks how to commit:
/// - one new file replacing at most itself: renaming it over its name is
///   atomic for every reader;
/// - several files, or one replacing others (a single file over a sharded
///   checkpoint): swap, or journal where a swap cannot work.
/// Destroying an uncommitted commit removes everything it staged, leaving
/// the old checkpoint as it was.
class TORCHSER_API CheckpointCommit {
 public:
  enum class Mode { kSingleFile, kSwap, kJournal };
  CheckpointCommit(
      const std::filesystem::path& directory,
      std::size_t new_files,
      bool durable);
  ~CheckpointCommit();
  CheckpointCommit(const CheckpointCommit&) = delete;
  CheckpointCommit& operator=(const CheckpointCommit&) = delete;

  Mode mode() const;
  /// The path a new file `name` is written at, with AtomicFile(target)
  /// .keep(durable) (the temporary is in the staging directory or beside the
  /// old files).
  std::filesystem::path target(const std::string& name) const;
  /// Records the temporary that becomes `name` at commit. Thread-safe.
  void stage(const std::string& name, const std::filesystem::path& temporary);
  /// Files of the old checkpoint the new one does not keep; called before
  /// the first target().
  void remove(std::vector<std::string> names);
  /// The commit point and everything after it.
  void commit();

 private:
  void prepare_swap();
  struct State;
  std::unique_ptr<State> state_;
};

/// The directory exchange a swap commits with (renameat2 with
/// RENAME_EXCHANGE: 0, or -1 and errno). Tests replace it to stand for a
/// filesystem without it; returns the one replaced.
using ExchangeDirectories = int (*)(const char* from, const char* to);
TORCHSER_API ExchangeDirectories
replace_exchange_for_testing(ExchangeDirectories exchange);

} // namespace torchser::detail
