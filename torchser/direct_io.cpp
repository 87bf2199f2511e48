#include "torchser/detail/direct_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#ifdef TORCHSER_HAVE_IO_URING
#include <liburing.h>
#endif

#include <torchser/errors.h>

#include "torchser/detail/file.h"

namespace torchser::detail {
namespace {

constexpr std::uint64_t kSmallRegion = std::uint64_t{1} << 20;
constexpr std::uint64_t kSharedAllocation = std::uint64_t{16} << 20;
constexpr std::uint64_t kSharedGap = std::uint64_t{64} << 10;
// Unwanted bytes between two ranges that one read still covers: cheaper
// than another request at this size.
constexpr std::uint64_t kMergeGap = std::uint64_t{1} << 20;
// Read sizes, measured on a virtio disk (tests/bench, section "cold"):
// straight into new memory, 4 MiB reads, 8 in flight, keep the device busy;
// through the staging ring, a ring that stays in the CPU's cache (1 MiB x 4)
// makes the copies out of it cheap enough to hide behind the reads, while
// an 8 MiB x 8 ring was 25% slower. CUDA rings are larger: each
// host-to-device copy has a fixed cost.
constexpr std::size_t kRegionBlock = std::size_t{4} << 20;
constexpr unsigned kRegionDepth = 8;
constexpr std::size_t kRingBlock = std::size_t{1} << 20;
constexpr unsigned kRingDepth = 4;
constexpr std::size_t kCudaRingBlock = std::size_t{8} << 20;
constexpr unsigned kCudaRingDepth = 4;

std::uint64_t align_down(std::uint64_t v) {
  return v / kDirectAlign * kDirectAlign;
}
std::uint64_t align_up(std::uint64_t v) {
  return (v + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
}

// Host memory aligned for O_DIRECT, freed with the last tensor on it.
struct HostBuffer {
  explicit HostBuffer(std::size_t n) {
    if (n == 0) {
      return;
    }
    if (::posix_memalign(&data, kDirectAlign, n) != 0) {
      throw std::bad_alloc();
    }
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() {
    std::free(data);
  }
  void* data = nullptr;
};

bool io_uring_allowed() {
#ifdef TORCHSER_HAVE_IO_URING
  // io_uring_disabled, a seccomp filter (containers) or an old kernel all
  // make the setup call fail; probed once.
  static const bool allowed = [] {
    struct io_uring ring;
    if (io_uring_queue_init(2, &ring, 0) != 0) {
      return false;
    }
    // IORING_OP_READ came with Linux 5.6; older kernels set rings up but
    // fail every read.
    io_uring_probe* probe = io_uring_get_probe_ring(&ring);
    const bool reads =
        probe != nullptr && io_uring_opcode_supported(probe, IORING_OP_READ);
    if (probe != nullptr) {
      io_uring_free_probe(probe);
    }
    io_uring_queue_exit(&ring);
    return reads;
  }();
  return allowed;
#else
  return false;
#endif
}

// Faults in the memory of planned reads on helper threads, in read order,
// ahead of the reads (see read_regions). Small loads are not worth threads:
// their pages are faulted by the reads themselves.
class Populator {
 public:
  template <typename Reads>
  Populator(const Reads& reads, std::uint64_t total) {
    constexpr std::uint64_t kWorthThreads = std::uint64_t{64} << 20;
    if (total < kWorthThreads) {
      return;
    }
    for (const auto& r : reads) {
      chunks_.push_back({r.dest, r.size});
    }
    ready_ = std::make_unique<std::atomic<bool>[]>(chunks_.size());
    const unsigned helpers =
        std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
    try {
      for (unsigned i = 0; i < helpers; ++i) {
        threads_.emplace_back([this] { work(); });
      }
    } catch (...) {
      // No helper at all: the reads fault their own pages.
      if (threads_.empty()) {
        chunks_.clear();
      }
    }
  }
  Populator(const Populator&) = delete;
  Populator& operator=(const Populator&) = delete;
  ~Populator() {
    stop_ = true;
    for (std::thread& t : threads_) {
      t.join();
    }
  }
  // Returns once chunk `i`'s memory is in (at once without helpers).
  void wait(std::size_t i) {
    if (threads_.empty()) {
      return;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return ready_[i].load(); });
  }

 private:
  void work() {
    for (;;) {
      const std::size_t i = next_++;
      if (i >= chunks_.size() || stop_) {
        return;
      }
      populate(chunks_[i].first, chunks_[i].second);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        ready_[i] = true;
      }
      done_.notify_all();
    }
  }
  static void populate(std::uint8_t* data, std::size_t size) {
#ifdef MADV_POPULATE_WRITE
    if (::madvise(data, size, MADV_POPULATE_WRITE) == 0) {
      return;
    }
#endif
    // Before Linux 5.14: a write to each page faults it in.
    for (std::size_t at = 0; at < size; at += 4096) {
      reinterpret_cast<volatile std::uint8_t*>(data)[at] = 0;
    }
  }
  std::vector<std::pair<std::uint8_t*, std::size_t>> chunks_;
  std::unique_ptr<std::atomic<bool>[]> ready_;
  std::atomic<std::size_t> next_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable done_;
  std::vector<std::thread> threads_;
};

template <typename Reads>
std::uint64_t total_bytes(const Reads& reads) {
  std::uint64_t n = 0;
  for (const auto& r : reads) {
    n += r.size;
  }
  return n;
}

} // namespace

const char* io_engine_name(IoEngine engine) {
  return engine == IoEngine::kIoUring ? "io_uring" : "threads";
}

IoEngine default_io_engine() {
  const char* chosen = std::getenv("TORCHSER_IO_ENGINE");
  if (chosen != nullptr && *chosen != '\0') {
    const std::string name = chosen;
    if (name == "threads") {
      return IoEngine::kThreads;
    }
    if (name == "io_uring") {
      if (!io_uring_allowed()) {
        throw ValueError(
            "TORCHSER_IO_ENGINE=io_uring, but " +
            std::string(
#ifdef TORCHSER_HAVE_IO_URING
                "this kernel refuses io_uring (kernel.io_uring_disabled or "
                "a seccomp filter)"
#else
                "this build of torchser has no io_uring (liburing-dev was "
                "not found when it was configured)"
#endif
                ));
      }
      return IoEngine::kIoUring;
    }
    throw ValueError(
        "TORCHSER_IO_ENGINE must be 'io_uring' or 'threads', not '" + name +
        "'");
  }
  return io_uring_allowed() ? IoEngine::kIoUring : IoEngine::kThreads;
}

// One read of the file, tracked until all its bytes are in.
struct DirectFile::Read {
  std::uint64_t offset = 0; // in the file
  std::uint8_t* dest = nullptr;
  std::size_t size = 0;   // bytes asked (aligned when direct)
  std::size_t expect = 0; // bytes that must come (the file may end first)
  std::size_t done = 0;
  std::size_t id = 0; // the caller's: a block, or a region's allocation
  bool buffered = false;
};

// Reads in flight: submit() queues one, wait() returns the next finished
// one (its tag and pread's result, or -errno).
class DirectFile::Queue {
 public:
  virtual ~Queue() = default;
  virtual void submit(
      int fd,
      void* dest,
      std::size_t size,
      std::uint64_t offset,
      unsigned tag) = 0;
  virtual std::pair<unsigned, std::int64_t> wait() = 0;
};

namespace {

class ThreadQueue final : public DirectFile::Queue {
 public:
  explicit ThreadQueue(unsigned threads) {
    try {
      for (unsigned i = 0; i < threads; ++i) {
        threads_.emplace_back([this] { work(); });
      }
    } catch (...) {
      // (A pids limit: the threads started so far end before this throws.)
      if (threads_.empty()) {
        throw;
      }
    }
  }
  ~ThreadQueue() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    jobs_ready_.notify_all();
    for (std::thread& t : threads_) {
      t.join();
    }
  }
  void submit(
      int fd,
      void* dest,
      std::size_t size,
      std::uint64_t offset,
      unsigned tag) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(Job{fd, dest, size, offset, tag});
    }
    jobs_ready_.notify_one();
  }
  std::pair<unsigned, std::int64_t> wait() override {
    std::unique_lock<std::mutex> lock(mutex_);
    done_ready_.wait(lock, [&] { return !done_.empty(); });
    const auto out = done_.front();
    done_.pop_front();
    return out;
  }

 private:
  struct Job {
    int fd;
    void* dest;
    std::size_t size;
    std::uint64_t offset;
    unsigned tag;
  };
  void work() {
    for (;;) {
      Job job{};
      {
        std::unique_lock<std::mutex> lock(mutex_);
        jobs_ready_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) {
          return;
        }
        job = jobs_.front();
        jobs_.pop_front();
      }
      ssize_t got;
      do {
        got =
            ::pread(job.fd, job.dest, job.size, static_cast<off_t>(job.offset));
      } while (got < 0 && errno == EINTR);
      const std::int64_t result = got < 0 ? -errno : got;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.emplace_back(job.tag, result);
      }
      done_ready_.notify_one();
    }
  }
  std::mutex mutex_;
  std::condition_variable jobs_ready_;
  std::condition_variable done_ready_;
  std::deque<Job> jobs_;
  std::deque<std::pair<unsigned, std::int64_t>> done_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

#ifdef TORCHSER_HAVE_IO_URING
class UringQueue final : public DirectFile::Queue {
 public:
  UringQueue(unsigned depth, const std::string& display) : display_(display) {
    const int rc = io_uring_queue_init(std::max(depth, 2u), &ring_, 0);
    if (rc != 0) {
      throw_os_error("Cannot set up io_uring to read", display, -rc);
    }
  }
  ~UringQueue() override {
    io_uring_queue_exit(&ring_);
  }
  void submit(
      int fd,
      void* dest,
      std::size_t size,
      std::uint64_t offset,
      unsigned tag) override {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) { // never: the ring has a slot per read in flight
      throw OSError(
          "io_uring submission queue full reading '" + display_ + "'");
    }
    io_uring_prep_read(sqe, fd, dest, static_cast<unsigned>(size), offset);
    io_uring_sqe_set_data(
        sqe, reinterpret_cast<void*>(static_cast<std::uintptr_t>(tag)));
    int rc;
    do {
      rc = io_uring_submit(&ring_);
    } while (rc == -EINTR);
    if (rc < 0) {
      throw OSError(
          "io_uring_submit failed reading '" + display_ +
          "': " + std::strerror(-rc));
    }
  }
  std::pair<unsigned, std::int64_t> wait() override {
    io_uring_cqe* cqe = nullptr;
    int rc;
    do {
      rc = io_uring_wait_cqe(&ring_, &cqe);
    } while (rc == -EINTR);
    if (rc < 0) {
      throw OSError(
          "io_uring_wait_cqe failed reading '" + display_ +
          "': " + std::strerror(-rc));
    }
    const auto tag = static_cast<unsigned>(
        reinterpret_cast<std::uintptr_t>(io_uring_cqe_get_data(cqe)));
    const std::int64_t result = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    return {tag, result};
  }

 private:
  io_uring ring_{};
  std::string display_;
};
#endif

} // namespace

DirectFile::DirectFile(
    const std::filesystem::path& path, std::string display, int same_as)
    : display_(std::move(display)), path_(path), engine_(default_io_engine()) {
  // /proc/self/fd/N opens the file N refers to, whatever its name is now.
  const std::string open_path =
      same_as >= 0 ? "/proc/self/fd/" + std::to_string(same_as) : path.string();
  buffered_fd_ = ::open(open_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (buffered_fd_ < 0 && same_as >= 0 && errno == ENOENT) {
    buffered_fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC); // no /proc
  }
  if (buffered_fd_ < 0) {
    throw_os_error("Cannot open", path, errno);
  }
  struct stat st {};
  if (::fstat(buffered_fd_, &st) != 0) {
    const int error = errno;
    ::close(buffered_fd_);
    throw_os_error("Cannot stat", path, error);
  }
  struct stat original {};
  if (same_as >= 0 &&
      (::fstat(same_as, &original) != 0 || original.st_dev != st.st_dev ||
       original.st_ino != st.st_ino)) {
    ::close(buffered_fd_);
    throw OSError(
        "Cannot read '" + display_ +
        "': it was replaced by another file while being opened; load again");
  }
  size_ = static_cast<std::uint64_t>(st.st_size);
  // Refused (EINVAL) by filesystems without direct I/O: every read is then
  // buffered, and the kernel's readahead does what it can.
  direct_fd_ = ::open(open_path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  if (direct_fd_ < 0) {
    ::posix_fadvise(buffered_fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
  }
}

DirectFile::~DirectFile() {
  if (direct_fd_ >= 0) {
    ::close(direct_fd_);
  }
  ::close(buffered_fd_);
}

void DirectFile::check_within(
    std::uint64_t offset, std::uint64_t nbytes) const {
  if (offset > size_ || nbytes > size_ - offset) {
    throw OSError(
        "Cannot read '" + display_ + "': bytes " + std::to_string(offset) +
        " to " + std::to_string(offset + nbytes) + " lie past its end (" +
        std::to_string(size_) + " bytes; was it truncated?)");
  }
}

DirectFile::Read DirectFile::read_at(
    std::uint64_t offset, std::size_t size, std::uint8_t* dest) const {
  Read r;
  r.offset = offset;
  r.size = size;
  // Aligned reads may run past the file's end; the bytes before it come.
  r.expect = static_cast<std::size_t>(
      std::min<std::uint64_t>(size, size_ - std::min(size_, offset)));
  r.dest = dest;
  return r;
}

void DirectFile::run(
    std::vector<Read>& reads,
    unsigned depth,
    const std::function<bool(Read&)>& next,
    const std::function<void(const Read&)>& finished) const {
  depth = std::max(depth, 1u);
  std::unique_ptr<Queue> queue;
#ifdef TORCHSER_HAVE_IO_URING
  if (engine_ == IoEngine::kIoUring) {
    try {
      queue = std::make_unique<UringQueue>(depth, display_);
    } catch (const OSError&) {
      // Out of locked memory or rings (RLIMIT_MEMLOCK, a busy machine):
      // the threads read instead.
    }
  }
#endif
  if (!queue) {
    queue = std::make_unique<ThreadQueue>(depth);
  }
  reads.assign(depth, Read{});
  std::vector<unsigned> free_tags;
  for (unsigned tag = depth; tag > 0; --tag) {
    free_tags.push_back(tag - 1);
  }
  unsigned in_flight = 0;
  std::exception_ptr error;
  bool more = true;
  const auto submit = [&](unsigned tag) {
    Read& r = reads[tag];
    const bool direct = direct_fd_ >= 0 && !r.buffered;
    queue->submit(
        direct ? direct_fd_ : buffered_fd_,
        r.dest + r.done,
        r.size - r.done,
        r.offset + r.done,
        tag);
    ++in_flight;
  };
  const auto fail = [&](std::exception_ptr e) {
    if (!error) {
      error = std::move(e);
    }
    more = false;
  };
  // Nothing may be in flight when this returns: the kernel (or a thread)
  // would write into memory that is about to be freed.
  for (;;) {
    while (more && !free_tags.empty()) {
      Read& r = reads[free_tags.back()];
      r = Read{};
      try {
        more = next(r);
      } catch (...) {
        fail(std::current_exception());
      }
      if (!more) {
        break;
      }
      const unsigned tag = free_tags.back();
      free_tags.pop_back();
      try {
        submit(tag);
      } catch (...) {
        free_tags.push_back(tag);
        fail(std::current_exception());
      }
    }
    if (in_flight == 0) {
      break;
    }
    const auto [tag, result] = queue->wait();
    --in_flight;
    Read& r = reads[tag];
    bool retry = false;
    if (result < 0) {
      if (result == -EINVAL && direct_fd_ >= 0 && !r.buffered) {
        // An alignment this device does not take: the rest buffered.
        r.buffered = true;
        retry = true;
      } else if (result == -EAGAIN || result == -EINTR) {
        retry = true;
      } else if (!error) {
        fail(std::make_exception_ptr(OSError(
            "Cannot read " + std::to_string(r.size - r.done) +
            " bytes at offset " + std::to_string(r.offset + r.done) + " of '" +
            display_ + "': " + std::strerror(static_cast<int>(-result)))));
      }
    } else if (result == 0 && r.done < r.expect) {
      fail(std::make_exception_ptr(OSError(
          "Cannot read '" + display_ + "': the file ends at byte " +
          std::to_string(r.offset + r.done) + ", but its tensor data runs to " +
          "byte " + std::to_string(r.offset + r.expect) +
          " (was it truncated while being read?)")));
    } else {
      r.done += static_cast<std::size_t>(result);
      // A short read that is not the file's end: the rest buffered, since
      // it no longer starts on an aligned offset.
      retry = r.done < r.expect;
      r.buffered = r.buffered || retry;
    }
    if (retry && !error) {
      try {
        submit(tag);
        continue;
      } catch (...) {
        fail(std::current_exception());
      }
    }
    if (!retry && !error) {
      try {
        finished(r);
      } catch (...) {
        fail(std::current_exception());
      }
    }
    free_tags.push_back(tag);
  }
  if (error) {
    std::rethrow_exception(error);
  }
}

std::vector<at::Tensor> DirectFile::read_regions(
    const std::vector<Region>& regions,
    const DirectReadOptions& options) const {
  std::vector<std::size_t> order(regions.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    order[i] = i;
    check_within(regions[i].offset, regions[i].nbytes);
  }
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return regions[a].offset < regions[b].offset;
  });
  // Allocations: each large region alone; small neighbours together.
  struct Allocation {
    std::uint64_t begin = 0; // aligned
    std::uint64_t end = 0;   // aligned
    std::vector<std::size_t> regions;
    std::shared_ptr<HostBuffer> memory;
  };
  std::vector<Allocation> allocations;
  bool open_small = false;
  for (const std::size_t i : order) {
    const Region& r = regions[i];
    if (r.nbytes == 0) {
      continue;
    }
    const std::uint64_t begin = align_down(r.offset);
    const std::uint64_t end = align_up(r.offset + r.nbytes);
    const bool small = r.nbytes < kSmallRegion;
    if (small && open_small &&
        r.offset <= allocations.back().end + kSharedGap &&
        end - allocations.back().begin <= kSharedAllocation) {
      allocations.back().end = std::max(allocations.back().end, end);
      allocations.back().regions.push_back(i);
      continue;
    }
    allocations.push_back(Allocation{begin, end, {i}, nullptr});
    open_small = small;
  }
  for (Allocation& a : allocations) {
    a.memory =
        std::make_shared<HostBuffer>(static_cast<std::size_t>(a.end - a.begin));
  }

  const std::size_t block = std::max(
      kDirectAlign, align_down(options.block ? options.block : kRegionBlock));
  const unsigned depth = options.depth ? options.depth : kRegionDepth;
  std::vector<Read> planned;
  for (const Allocation& a : allocations) {
    for (std::uint64_t at = a.begin; at < a.end; at += block) {
      planned.push_back(read_at(
          at,
          static_cast<std::size_t>(std::min<std::uint64_t>(block, a.end - at)),
          static_cast<std::uint8_t*>(a.memory->data) + (at - a.begin)));
    }
  }
  // New memory must be faulted in (zeroed by the kernel) before the device
  // can write it. An O_DIRECT read faults its pages in the submitting thread,
  // one read after another (and io_uring submits from this one); on a
  // machine zeroing ~3 GB/s per core that takes longer than the read. So
  // helpers populate the reads' memory ahead of them, in parallel, and each
  // read is submitted once its memory is in.
  Populator populator(planned, total_bytes(planned));
  std::size_t next = 0;
  std::vector<Read> reads;
  run(
      reads,
      static_cast<unsigned>(std::min<std::size_t>(depth, planned.size())),
      [&](Read& r) {
        if (next == planned.size()) {
          return false;
        }
        populator.wait(next);
        r = planned[next++];
        return true;
      },
      [](const Read&) {});

  std::vector<at::Tensor> out(regions.size());
  for (const Allocation& a : allocations) {
    for (const std::size_t i : a.regions) {
      out[i] = at::from_blob(
          static_cast<std::uint8_t*>(a.memory->data) +
              (regions[i].offset - a.begin),
          {static_cast<std::int64_t>(regions[i].nbytes)},
          [keep = a.memory](void*) {},
          at::TensorOptions().dtype(at::kByte));
    }
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!out[i].defined()) {
      out[i] = at::empty({0}, at::TensorOptions().dtype(at::kByte));
    }
  }
  return out;
}

void DirectFile::read_into(
    const std::vector<Transfer>& transfers,
    const std::function<void(std::size_t)>& done,
    const DirectReadOptions& options) const {
  std::vector<std::size_t> order;
  std::vector<std::uint64_t> left(transfers.size());
  bool cuda = false;
  for (std::size_t i = 0; i < transfers.size(); ++i) {
    const Transfer& t = transfers[i];
    if (!t.dest.is_contiguous() || !(t.dest.is_cpu() || t.dest.is_cuda())) {
      throw ValueError(
          "Cannot read '" + display_ + "' into a " +
          (t.dest.is_contiguous() ? t.dest.device().str() + " tensor"
                                  : std::string("non-contiguous tensor")) +
          ": the direct reader fills contiguous CPU or CUDA tensors");
    }
    left[i] = static_cast<std::uint64_t>(t.dest.nbytes());
    check_within(t.offset, left[i]);
    if (left[i] > 0) {
      order.push_back(i);
      cuda = cuda || t.dest.is_cuda();
    }
  }
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return transfers[a].offset < transfers[b].offset;
  });
  // Blocks: the aligned ranges around the transfers, neighbours merged,
  // cut into reads of at most `block` bytes.
  const std::size_t block = std::max(
      kDirectAlign,
      align_down(
          options.block ? options.block
          : cuda        ? kCudaRingBlock
                        : kRingBlock));
  struct Block {
    std::uint64_t begin = 0;
    std::uint64_t end = 0;
  };
  std::vector<Block> blocks;
  {
    std::vector<Block> ranges;
    for (const std::size_t i : order) {
      const std::uint64_t begin = align_down(transfers[i].offset);
      const std::uint64_t end = align_up(transfers[i].offset + left[i]);
      if (!ranges.empty() &&
          begin <= ranges.back().end + options.merge_gap.value_or(kMergeGap)) {
        ranges.back().end = std::max(ranges.back().end, end);
      } else {
        ranges.push_back(Block{begin, end});
      }
    }
    for (const Block& r : ranges) {
      for (std::uint64_t at = r.begin; at < r.end; at += block) {
        blocks.push_back(Block{at, std::min<std::uint64_t>(r.end, at + block)});
      }
    }
  }
  for (std::size_t i = 0; i < transfers.size(); ++i) {
    if (left[i] == 0) {
      done(i);
    }
  }
  if (blocks.empty()) {
    return;
  }

  const unsigned depth = options.depth ? options.depth
                         : cuda        ? kCudaRingDepth
                                       : kRingDepth;
  // The ring: a staging buffer per read in flight (the read's tag).
  std::vector<at::Tensor> pinned(depth);
  std::vector<std::unique_ptr<HostBuffer>> staging(depth);
  std::vector<std::vector<c10::Event>> copied(depth);
  const auto slot_memory = [&](unsigned tag) -> std::uint8_t* {
    if (cuda) {
      if (!pinned[tag].defined()) {
        // CUDA's host allocator gives page-aligned memory; one that does
        // not (cudaHostRegister'd malloc) is offset to the next 4 KiB.
        const at::Tensor memory = at::empty(
            {static_cast<std::int64_t>(block + kDirectAlign)},
            at::TensorOptions().dtype(at::kByte).pinned_memory(true));
        const auto address =
            reinterpret_cast<std::uintptr_t>(memory.data_ptr());
        pinned[tag] = memory.narrow(
            0,
            static_cast<std::int64_t>(align_up(address) - address),
            static_cast<std::int64_t>(block));
      }
      return static_cast<std::uint8_t*>(pinned[tag].data_ptr());
    }
    if (!staging[tag]) {
      staging[tag] = std::make_unique<HostBuffer>(block);
    }
    return static_cast<std::uint8_t*>(staging[tag]->data);
  };
  // A staging buffer is written again only once the copies out of it that
  // the GPU has queued are done.
  const auto wait_copies = [&](unsigned tag) {
    for (const c10::Event& event : copied[tag]) {
      while (!event.query()) {
        std::this_thread::yield();
      }
    }
    copied[tag].clear();
  };

  // What each block holds for whom: one sweep over both sorted lists (a
  // transfer stays active from its first block to its last).
  struct Piece {
    std::size_t transfer;
    std::uint64_t from; // in the file
    std::uint64_t to;
  };
  std::vector<std::vector<Piece>> pieces(blocks.size());
  {
    std::vector<std::size_t> active;
    std::size_t k = 0;
    for (std::size_t b = 0; b < blocks.size(); ++b) {
      while (k < order.size() && transfers[order[k]].offset < blocks[b].end) {
        active.push_back(order[k++]);
      }
      std::vector<std::size_t> still;
      for (const std::size_t i : active) {
        const std::uint64_t end = transfers[i].offset + left[i];
        const std::uint64_t from =
            std::max(transfers[i].offset, blocks[b].begin);
        const std::uint64_t to = std::min(end, blocks[b].end);
        if (from < to) {
          pieces[b].push_back({i, from, to});
        }
        if (end > blocks[b].end) {
          still.push_back(i);
        }
      }
      active.swap(still);
    }
  }

  std::size_t next_block = 0;
  std::vector<Read> reads;
  struct WaitAll {
    std::function<void()> f;
    ~WaitAll() {
      f();
    }
  } wait_all{[&] {
    for (unsigned tag = 0; tag < depth; ++tag) {
      try {
        wait_copies(tag);
      } catch (...) {
      }
    }
  }};
  run(
      reads,
      static_cast<unsigned>(std::min<std::size_t>(depth, blocks.size())),
      [&](Read& r) {
        if (next_block == blocks.size()) {
          return false;
        }
        // Which tag this read gets: the one run() is filling.
        const auto tag = static_cast<unsigned>(&r - reads.data());
        wait_copies(tag);
        const Block& b = blocks[next_block];
        r = read_at(
            b.begin,
            static_cast<std::size_t>(b.end - b.begin),
            slot_memory(tag));
        r.id = next_block++;
        return true;
      },
      [&](const Read& r) {
        const auto tag = static_cast<unsigned>(&r - reads.data());
        const Block& b = blocks[r.id];
        std::vector<c10::Device> devices;
        for (const Piece& piece : pieces[r.id]) {
          const std::size_t i = piece.transfer;
          const Transfer& t = transfers[i];
          const std::uint64_t from = piece.from;
          const std::uint64_t to = piece.to;
          const std::uint8_t* src = r.dest + (from - b.begin);
          const std::size_t n = static_cast<std::size_t>(to - from);
          auto* dst =
              static_cast<std::uint8_t*>(t.dest.data_ptr()) + (from - t.offset);
          if (t.dest.is_cpu()) {
            std::memcpy(dst, src, n);
          } else {
            const auto bytes = at::TensorOptions().dtype(at::kByte);
            at::from_blob(
                dst,
                {static_cast<std::int64_t>(n)},
                bytes.device(t.dest.device()))
                .copy_(
                    pinned[tag].narrow(
                        0,
                        static_cast<std::int64_t>(src - r.dest),
                        static_cast<std::int64_t>(n)),
                    /*non_blocking=*/true);
            if (std::find(devices.begin(), devices.end(), t.dest.device()) ==
                devices.end()) {
              devices.push_back(t.dest.device());
            }
          }
          left[i] -= n;
          if (left[i] == 0) {
            done(i);
          }
        }
        for (const c10::Device& device : devices) {
          const c10::impl::VirtualGuardImpl guard(device.type());
          copied[tag].emplace_back(device.type());
          copied[tag].back().record(guard.getStream(device));
        }
      });
}

std::vector<at::Tensor> read_tensors(
    const DirectFile& file,
    const std::vector<TensorSpec>& specs,
    const c10::Device& device) {
  std::vector<at::Tensor> out(specs.size());
  const auto nbytes_of = [](const TensorSpec& spec) {
    std::uint64_t n = c10::elementSize(spec.dtype);
    for (const std::int64_t size : spec.sizes) {
      n *= static_cast<std::uint64_t>(size);
    }
    return n;
  };
  if (device.is_cuda() && !at::hasCUDA()) {
    throw ValueError(
        "Device " + device.str() + " was requested for '" + file.display() +
        "', but this LibTorch build has no CUDA support.");
  }
  if (!device.is_cpu() && !device.is_cuda()) {
    // No staging ring for other devices: read to the host, then copy.
    std::vector<at::Tensor> host =
        read_tensors(file, specs, c10::Device(c10::kCPU));
    for (at::Tensor& t : host) {
      t = t.to(device);
    }
    return host;
  }
  if (device.is_cuda()) {
    std::vector<DirectFile::Transfer> transfers;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      out[i] = at::empty(
          specs[i].sizes,
          at::TensorOptions().dtype(specs[i].dtype).device(device));
      transfers.push_back({specs[i].offset, out[i]});
    }
    file.read_into(transfers, [](std::size_t) {});
    return out;
  }
  std::vector<DirectFile::Region> regions;
  regions.reserve(specs.size());
  for (const TensorSpec& spec : specs) {
    regions.push_back({spec.offset, nbytes_of(spec)});
  }
  const std::vector<at::Tensor> bytes = file.read_regions(regions);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto options = at::TensorOptions().dtype(specs[i].dtype);
    void* data = bytes[i].data_ptr();
    if (bytes[i].numel() == 0) {
      out[i] = at::empty(specs[i].sizes, options);
    } else if (
        reinterpret_cast<std::uintptr_t>(data) %
            c10::elementSize(specs[i].dtype) ==
        0) {
      out[i] = at::from_blob(
          data, specs[i].sizes, [keep = bytes[i]](void*) {}, options);
    } else {
      out[i] = at::empty(specs[i].sizes, options);
      std::memcpy(
          out[i].data_ptr(), data, static_cast<std::size_t>(regions[i].nbytes));
    }
  }
  return out;
}

} // namespace torchser::detail
