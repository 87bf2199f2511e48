#pragma once

// POSIX file plumbing shared by the readers and writers. Never installed;
// exported only so that the tests can reach it.
//
// Every error names the file and says what failed (with strerror): a missing
// file is a FileNotFoundError, any other failure an OSError.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include <torchser/export.h>

namespace torchser::detail {

/// Throws FileNotFoundError (ENOENT) or OSError for `path`, built from
/// `what` ("cannot open", "cannot read", ...) and errno `error`.
[[noreturn]] TORCHSER_API void throw_os_error(
    const std::string& what, const std::filesystem::path& path, int error);

/// Reads exactly `size` bytes at `offset` of descriptor `fd`, looping over
/// short reads; a file that ends early is an OSError naming `path` and the
/// offsets.
TORCHSER_API void pread_exact(
    int fd,
    const std::filesystem::path& path,
    void* data,
    std::size_t size,
    std::uint64_t offset);

/// Writes all `size` bytes at `offset` of descriptor `fd`, looping over
/// short writes; OSError naming `path` and the offset.
TORCHSER_API void pwrite_all(
    int fd,
    const std::filesystem::path& path,
    const void* data,
    std::uint64_t size,
    std::uint64_t offset);

/// An open file descriptor, closed on destruction.
class TORCHSER_API File {
 public:
  /// Opens `path` read-only.
  static File open_read(const std::filesystem::path& path);
  /// Opens the existing file `path` for positional reads and writes (a file
  /// another writer created, written at its offsets).
  static File open_write(const std::filesystem::path& path);

  File() = default;
  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  int fd() const noexcept {
    return fd_;
  }
  const std::filesystem::path& path() const noexcept {
    return path_;
  }
  /// The file's size in bytes (fstat).
  std::uint64_t size() const;
  /// Reads exactly `size` bytes at `offset`, looping over short reads (and
  /// advancing both the pointer and the offset). A file that ends early is
  /// an OSError naming the offsets.
  void pread_exact(void* data, std::size_t size, std::uint64_t offset) const;
  /// Writes all of `data` at the current position, looping over short writes.
  void write_all(const void* data, std::size_t size) const;

 private:
  File(int fd, std::filesystem::path path) : fd_(fd), path_(std::move(path)) {}
  int fd_ = -1;
  std::filesystem::path path_;
  friend class AtomicFile;
};

/// A read-only, copy-on-write private mapping of a whole file. Tensors built
/// on it hold a shared_ptr, so the mapping lives while any of them does;
/// writing into such a tensor copies the touched page, never the file.
class TORCHSER_API MappedFile {
 public:
  /// Maps `file` (which may be empty: then data() is nullptr).
  static std::shared_ptr<const MappedFile> map(const File& file);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const noexcept {
    return data_;
  }
  std::uint64_t size() const noexcept {
    return size_;
  }
  const std::filesystem::path& path() const noexcept {
    return path_;
  }
  /// madvise() on bytes [offset, offset + size) of the mapping (page
  /// aligned); a hint, failures are ignored.
  void advise_range(
      std::uint64_t offset, std::uint64_t size, int advice) const noexcept;

 private:
  MappedFile(std::uint8_t* data, std::uint64_t size, std::filesystem::path path)
      : data_(data), size_(size), path_(std::move(path)) {}
  std::uint8_t* data_;
  std::uint64_t size_;
  std::filesystem::path path_;
};

/// A file written under a temporary name beside its target and renamed over
/// it by commit(), so that readers (and a crash) see either the old file or
/// the complete new one, and a file that is memory-mapped by live tensors is
/// never truncated under them. Destroying an uncommitted AtomicFile removes
/// the temporary file.
class TORCHSER_API AtomicFile {
 public:
  /// Creates the temporary file beside `target`.
  explicit AtomicFile(std::filesystem::path target);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Reserves `size` bytes on disk up front (fallocate), where the filesystem
  /// supports it: a full disk fails here, before any data is written, and
  /// ext4 writes into reserved extents about twice as fast as it allocates
  /// blocks during writeback. Filesystems without fallocate are left alone.
  void preallocate(std::uint64_t size);
  /// Appends `size` bytes through a 1 MiB buffer; large blocks bypass it.
  void write(const void* data, std::size_t size);
  /// Overwrites `size` bytes already written, at absolute `offset`.
  void patch(const void* data, std::size_t size, std::uint64_t offset);
  /// Flushes, optionally fsyncs the file, renames it over the target, and
  /// (when `durable`) fsyncs the directory so the rename itself survives a
  /// power loss.
  void commit(bool durable);
  /// Flushes and optionally fsyncs the file, and keeps it under its
  /// temporary name (for a caller that renames several files at one commit
  /// point). Returns the temporary path.
  std::filesystem::path keep(bool durable);

  const std::filesystem::path& target() const noexcept {
    return target_;
  }
  const std::filesystem::path& temporary_path() const noexcept {
    return file_.path();
  }

 private:
  void flush_buffer();
  std::filesystem::path target_;
  File file_;
  std::unique_ptr<std::uint8_t[]> buffer_;
  std::size_t buffered_ = 0;
  bool committed_ = false;
};

/// The infix of AtomicFile's temporary names: "<target>.torchser-tmp.XXXXXX".
inline constexpr const char* kTemporaryInfix = ".torchser-tmp.";

/// fsyncs the directory `directory` (after renames into it).
TORCHSER_API void fsync_directory(const std::filesystem::path& directory);

} // namespace torchser::detail
