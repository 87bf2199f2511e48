#pragma once

// The cold-cache reader behind LoadBackend::kDirect: large aligned reads,
// several in flight, that bypass the page cache (O_DIRECT) and land in the
// tensors' memory. Never installed; exported only so that the tests and the
// benchmark can reach it.
//
// Two ways to land bytes:
// - read_regions(): new host memory, allocated so that the file's aligned
//   blocks fall straight into it (no copy at all): new tensors.
// - read_into(): existing tensors (a module's, or new device tensors),
//   through a ring of staging buffers (pinned for CUDA) whose copies out
//   overlap the reads still in flight.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include <torchser/export.h>

namespace torchser::detail {

/// How reads are kept in flight.
enum class IoEngine {
  kIoUring, ///< one io_uring (Debian's liburing), where built and allowed
  kThreads, ///< a pool of threads each blocking in pread()
};

/// "io_uring" or "threads".
TORCHSER_API const char* io_engine_name(IoEngine engine);

/// The engine a new DirectFile uses: $TORCHSER_IO_ENGINE ("io_uring" or
/// "threads") when set, else io_uring where this build has it and the
/// kernel allows it (io_uring_disabled, seccomp), else threads.
TORCHSER_API IoEngine default_io_engine();

/// Sizes of the reads: `block` bytes each (a multiple of kDirectAlign),
/// `depth` of them in flight; 0 picks what measured best here (see
/// direct_io.cpp).
struct TORCHSER_API DirectReadOptions {
  std::size_t block = 0;
  unsigned depth = 0;
  /// read_into: transfers whose aligned ranges lie at most this many bytes
  /// apart are read as one range (fewer, larger reads, at the price of the
  /// bytes between); 0 merges only touching ranges. Unset: 1 MiB.
  std::optional<std::uint64_t> merge_gap;
};

/// Alignment of file offsets, lengths and memory for O_DIRECT: 4096 covers
/// both logical block sizes disks report (512 and 4096).
inline constexpr std::size_t kDirectAlign = 4096;

/// A file opened twice: with O_DIRECT where the filesystem allows it (tmpfs
/// and some FUSE filesystems refuse it: then every read is buffered), and
/// buffered for the few reads O_DIRECT cannot do.
class TORCHSER_API DirectFile {
 public:
  /// Opens `path`; `display` names it in messages. FileNotFoundError /
  /// OSError as File::open_read. With `same_as` (an open descriptor of the
  /// file whose header was read), the very same file is opened again
  /// through /proc/self/fd, even if a save has renamed another over `path`
  /// since; OSError if that cannot be made sure of.
  DirectFile(
      const std::filesystem::path& path, std::string display, int same_as = -1);
  DirectFile(const DirectFile&) = delete;
  DirectFile& operator=(const DirectFile&) = delete;
  ~DirectFile();

  /// Whether reads bypass the page cache.
  bool direct() const noexcept {
    return direct_fd_ >= 0;
  }
  std::uint64_t size() const noexcept {
    return size_;
  }
  const std::string& display() const noexcept {
    return display_;
  }
  IoEngine engine() const noexcept {
    return engine_;
  }

  /// A byte range of the file whose bytes become new host memory.
  struct Region {
    std::uint64_t offset = 0;
    std::uint64_t nbytes = 0;
  };
  /// Reads every region into new host memory and returns, for each, a byte
  /// tensor of exactly its bytes (regions of under 1 MiB that lie close
  /// together share one allocation, larger ones have their own; a region's
  /// memory lives while any tensor on it does). Blocks are read straight
  /// into that memory. OSError naming the file when it is shorter than a
  /// region (truncated while loading) or a read fails; nothing is left in
  /// flight when it throws.
  std::vector<at::Tensor> read_regions(
      const std::vector<Region>& regions,
      const DirectReadOptions& options = {}) const;

  /// A byte range of the file and the contiguous tensor whose bytes it
  /// fills (CPU or CUDA; its nbytes must equal the range's).
  struct Transfer {
    std::uint64_t offset = 0;
    at::Tensor dest;
  };
  /// Fills each transfer's tensor through a ring of `depth` staging buffers
  /// of `block` bytes (pinned when a destination is on CUDA, copied with
  /// asynchronous host-to-device copies on the current stream), calling
  /// `done(i)` as transfer i's last bytes are copied (for CUDA: queued; the
  /// stream orders what follows). Errors as read_regions().
  void read_into(
      const std::vector<Transfer>& transfers,
      const std::function<void(std::size_t)>& done,
      const DirectReadOptions& options = {}) const;

  /// One read in flight, and the engines that keep them (direct_io.cpp).
  struct Read;
  class Queue;

 private:
  // OSError unless [offset, offset + nbytes) lies within the file.
  void check_within(std::uint64_t offset, std::uint64_t nbytes) const;
  // A read of `size` bytes at `offset` into `dest`, expecting the bytes up
  // to the file's end.
  Read read_at(
      std::uint64_t offset, std::size_t size, std::uint8_t* dest) const;
  void run(
      std::vector<Read>& reads,
      unsigned depth,
      const std::function<bool(Read&)>& next,
      const std::function<void(const Read&)>& finished) const;

  std::string display_;
  std::filesystem::path path_;
  int direct_fd_ = -1;
  int buffered_fd_ = -1;
  std::uint64_t size_ = 0;
  IoEngine engine_ = IoEngine::kThreads;
};

/// Where a tensor's row-major elements lie in a file.
struct TORCHSER_API TensorSpec {
  std::uint64_t offset = 0;
  std::vector<std::int64_t> sizes;
  at::ScalarType dtype = at::kFloat;
};

/// New contiguous tensors of `specs` on `device`, read with `file`: on the
/// CPU straight into their memory (read_regions; a tensor whose offset is
/// not aligned for its dtype, as some old writers left them, gets an
/// aligned copy), elsewhere through read_into()'s pinned ring into tensors
/// allocated there.
TORCHSER_API std::vector<at::Tensor> read_tensors(
    const DirectFile& file,
    const std::vector<TensorSpec>& specs,
    const c10::Device& device);

} // namespace torchser::detail
