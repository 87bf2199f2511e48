#pragma once

// Advisory locks on a checkpoint directory itself (flock on its file
// descriptor: no lock file shows up among the checkpoint's files).
//
// - A save holds the lock exclusively for its whole duration, so savers of one
//   directory take turns and recovery never mistakes the temporary files of a
//   save in progress for leftovers.
// - A load of a directory holds it shared from resolving the checkpoint to
//   the last copied tensor, so it never sees the renames of a commit halfway
//   (new index, old shard): a load that starts during a save waits for it.
//
// flock is advisory and per open file description; on file systems without
// it (some network mounts) the lock is not held and torchser goes on as
// before (the commit protocol still keeps every file whole).

#include <filesystem>

#include <torchser/export.h>

namespace torchser::detail {

class TORCHSER_API DirectoryLock {
 public:
  enum class Mode { kShared, kExclusive };
  DirectoryLock(const std::filesystem::path& directory, Mode mode, bool wait);
  ~DirectoryLock();
  DirectoryLock(DirectoryLock&& other) noexcept;
  DirectoryLock& operator=(DirectoryLock&&) = delete;
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;

  /// Whether the lock is held.
  bool held() const {
    return held_;
  }
  /// Exclusive → shared (not atomic: a waiting saver may go first, after
  /// which this waits for it).
  void downgrade();

 private:
  int fd_ = -1;
  bool held_ = false;
};

/// The lock a load of `directory` holds: shared, after completing any
/// interrupted save (which needs the lock exclusively for a moment).
TORCHSER_API DirectoryLock lock_for_reading(const std::filesystem::path& directory);

} // namespace torchser::detail
